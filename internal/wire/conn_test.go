package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// pattern is size bytes that differ with seed and position.
func pattern(seed, size int) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(seed*31 + i*7 + i>>8)
	}
	return b
}

func TestRoundTrip(t *testing.T) {
	msgs := []struct {
		kind uint16
		size int
	}{
		{0, 0},
		{1, 1},
		{2, 15},
		{3, 16},
		{4, 17},
		{0x1234, 4096},
		{7, readBuf - headerLen - tagLen}, // exactly fills the read buffer
		{7, readBuf + 1},
		{KindError - 1, 1 << 20},
		{9, MaxPayload},
		{0, 0},
	}
	for _, transport := range []string{"tcp", "pipe"} {
		t.Run(transport, func(t *testing.T) {
			var a, b net.Conn
			if transport == "pipe" {
				a, b = net.Pipe()
			} else {
				a, b = tcpConns(t)
			}
			client, server := mustShake(t, a, b, newTestKey(t))
			// Each side sends every message while the other receives
			// them: client to server, then the same back.
			for _, dir := range []struct {
				name     string
				from, to *Conn
			}{{"client to server", client, server}, {"server to client", server, client}} {
				sent := make(chan error, 1)
				go func() {
					for i, m := range msgs {
						if err := dir.from.Send(m.kind, pattern(i, m.size)); err != nil {
							sent <- err
							return
						}
					}
					sent <- nil
				}()
				for i, m := range msgs {
					kind, p, err := dir.to.Recv()
					if err != nil {
						t.Fatalf("%s: message %d: %v", dir.name, i, err)
					}
					if kind != m.kind || !bytes.Equal(p, pattern(i, m.size)) {
						t.Fatalf("%s: message %d: kind %d and %d bytes, want kind %d and %d bytes (equal: %v)", dir.name, i, kind, len(p), m.kind, m.size, bytes.Equal(p, pattern(i, m.size)))
					}
				}
				if err := <-sent; err != nil {
					t.Fatalf("%s: Send: %v", dir.name, err)
				}
			}
			if client.Sent() != server.Received() || server.Sent() != client.Received() {
				t.Errorf("client sent %d, server received %d; server sent %d, client received %d", client.Sent(), server.Received(), server.Sent(), client.Received())
			}
			want := int64(helloLen + proofLen)
			for _, m := range msgs {
				want += int64(headerLen + m.size + tagLen)
			}
			if client.Sent() != want {
				t.Errorf("client sent %d bytes, want %d (handshake and framing included)", client.Sent(), want)
			}
		})
	}
}

// A payload over MaxPayload is refused before anything is sent; the Conn
// goes on working.
func TestSendTooLarge(t *testing.T) {
	client, server := tcpPair(t, newTestKey(t))
	before := client.Sent()
	err := client.Send(1, make([]byte, MaxPayload+1))
	if err == nil || !strings.Contains(err.Error(), fmt.Sprint(MaxPayload+1)) {
		t.Fatalf("Send of MaxPayload+1 bytes: %v, want an error naming the size", err)
	}
	if client.Sent() != before {
		t.Errorf("a refused Send wrote %d bytes", client.Sent()-before)
	}
	if err := client.Send(2, []byte("still here")); err != nil {
		t.Fatalf("Send after a refused one: %v", err)
	}
	if kind, p, err := server.Recv(); err != nil || kind != 2 || string(p) != "still here" {
		t.Errorf("Recv = %d, %q, %v; want 2, \"still here\"", kind, p, err)
	}
}

// Sends from several goroutines arrive whole, each goroutine's in order.
func TestConcurrentSends(t *testing.T) {
	client, server := tcpPair(t, newTestKey(t))
	const senders, each = 8, 50
	var wg sync.WaitGroup
	errs := make(chan error, senders)
	for g := range senders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				p := pattern(g*1000+i, 1000+g*4000+i)
				binary.BigEndian.PutUint32(p, uint32(i))
				if err := client.Send(uint16(g), p); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	next := make([]int, senders)
	for range senders * each {
		kind, p, err := server.Recv()
		if err != nil {
			t.Fatalf("Recv: %v", err)
		}
		g := int(kind)
		i := next[g]
		want := pattern(g*1000+i, 1000+g*4000+i)
		binary.BigEndian.PutUint32(want, uint32(i))
		if !bytes.Equal(p, want) {
			t.Fatalf("message %d of sender %d arrived changed or out of order", i, g)
		}
		next[g]++
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("Send: %v", err)
	}
}

// What an attacker on the path does to the frames is noticed: the
// receiver's Recv fails with ErrAuth at the first frame that is not the
// one it expects, and every Recv after it fails too.
func TestTamperedFrames(t *testing.T) {
	flip := func(frame, off int, bit byte) frameEditor {
		return func(i int, f []byte) [][]byte {
			if i == frame {
				f[off] ^= bit
			}
			return [][]byte{f}
		}
	}
	var held []byte
	tests := []struct {
		name   string
		edit   frameEditor
		good   int // frames received before the failure
		saying string
	}{
		{name: "untouched", edit: flip(-1, 0, 0), good: 4},
		{name: "bit flipped in the payload", edit: flip(1, headerLen+10, 0x01), good: 1, saying: "frame 1 does not verify"},
		{name: "bit flipped in the tag", edit: flip(0, headerLen+100+tagLen-1, 0x80), good: 0},
		{name: "kind changed", edit: flip(2, 5, 0x01), good: 2},
		{name: "length shorter", edit: flip(0, 3, 0x04), good: 0}, // 100 = 0x64 becomes 0x60
		{name: "length one more", edit: flip(0, 3, 0x01), good: 0},
		{name: "length over MaxPayload", edit: flip(1, 0, 0x80), good: 1, saying: "more than the"},
		{
			name: "frame replayed",
			edit: func(i int, f []byte) [][]byte {
				if i == 1 {
					return [][]byte{f, bytes.Clone(f)}
				}
				return [][]byte{f}
			},
			good:   2,
			saying: "frame 2 does not verify",
		},
		{
			name: "frame dropped",
			edit: func(i int, f []byte) [][]byte {
				if i == 1 {
					return nil
				}
				return [][]byte{f}
			},
			good: 1,
		},
		{
			name: "frames reordered",
			edit: func(i int, f []byte) [][]byte {
				switch i {
				case 0:
					held = f
					return nil
				case 1:
					return [][]byte{f, held}
				}
				return [][]byte{f}
			},
			good: 0,
		},
		{
			name: "an earlier frame in place of a later one",
			edit: func(i int, f []byte) [][]byte {
				if i == 0 {
					held = bytes.Clone(f)
				}
				if i == 1 {
					return [][]byte{held}
				}
				return [][]byte{f}
			},
			good: 1,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			client, server := proxiedPair(t, newTestKey(t), tc.edit)
			go func() {
				for i := range 4 {
					if err := client.Send(uint16(i), pattern(i, 100)); err != nil {
						return
					}
				}
			}()
			for i := range tc.good {
				kind, p, err := server.Recv()
				if err != nil || kind != uint16(i) || !bytes.Equal(p, pattern(i, 100)) {
					t.Fatalf("Recv %d = %d, %d bytes, %v; want kind %d and its payload", i, kind, len(p), err, i)
				}
			}
			if tc.good == 4 {
				return
			}
			server.SetDeadline(time.Now().Add(5 * time.Second))
			_, _, err := server.Recv()
			if !isAuth(err) {
				t.Fatalf("Recv of a tampered stream: %v, want an error matching ErrAuth", err)
			}
			checkOneLine(t, err)
			if !strings.Contains(err.Error(), tc.saying) {
				t.Errorf("Recv: %v, want it to say %q", err, tc.saying)
			}
			if _, _, again := server.Recv(); !errors.Is(again, ErrAuth) {
				t.Errorf("Recv after a failed one: %v, want the same error again", again)
			}
		})
	}
}

func TestRecvJSON(t *testing.T) {
	client, server := tcpPair(t, newTestKey(t))
	type msg struct {
		Gen  int    `json:"gen"`
		Name string `json:"name"`
	}
	go func() {
		_ = client.SendJSON(3, map[string]any{"gen": 7, "name": "job", "later": "a field this side does not know"})
		_ = client.SendJSON(4, msg{Gen: 8})
		_ = client.SendError("no space left\non the standby's store\r\n")
		_ = client.Send(3, []byte("{not json"))
		_ = client.SendJSON(3, msg{Gen: 9})
	}()

	var m msg
	if err := server.RecvJSON(3, &m); err != nil || m != (msg{7, "job"}) {
		t.Errorf("RecvJSON = %+v, %v; want {7 job} (unknown fields ignored)", m, err)
	}

	err := server.RecvJSON(3, &m)
	if err == nil || !strings.Contains(err.Error(), "expected a message of kind 3, got one of kind 4") {
		t.Errorf("RecvJSON of the wrong kind: %v, want an error naming both kinds", err)
	}

	err = server.RecvJSON(3, &m)
	var remote *RemoteError
	if !errors.As(err, &remote) {
		t.Fatalf("RecvJSON of a KindError: %v, want a *RemoteError", err)
	}
	if want := "no space left on the standby's store"; remote.Msg != want || err.Error() != "peer: "+want {
		t.Errorf("RemoteError %q (Msg %q), want Msg %q", err, remote.Msg, want)
	}

	if err := server.RecvJSON(3, &m); err == nil || !strings.Contains(err.Error(), "decoding a message of kind 3") {
		t.Errorf("RecvJSON of bad JSON: %v, want a decoding error", err)
	}

	// None of these broke the Conn.
	if err := server.RecvJSON(3, &m); err != nil || m.Gen != 9 {
		t.Errorf("RecvJSON after errors = %+v, %v; want gen 9", m, err)
	}
}

func TestRemoteError(t *testing.T) {
	client, server := tcpPair(t, newTestKey(t))
	long := strings.Repeat("é", maxErrorMsg) // 2 bytes each: the cut falls within one
	go func() {
		_ = client.SendError("disk full")
		_ = client.SendError(long)
	}()
	kind, p, err := server.Recv()
	var remote *RemoteError
	if kind != KindError || string(p) != "disk full" || !errors.As(err, &remote) || remote.Msg != "disk full" {
		t.Errorf("Recv = %#x, %q, %v; want KindError and a *RemoteError saying \"disk full\"", kind, p, err)
	}
	_, _, err = server.Recv()
	if !errors.As(err, &remote) || len(remote.Msg) > maxErrorMsg || !strings.HasPrefix(long, remote.Msg) || len(remote.Msg) < maxErrorMsg-4 {
		t.Errorf("a long error message arrived as %d bytes, want it cut to at most %d at a character", len(remote.Msg), maxErrorMsg)
	}
}

// A Recv that times out with nothing of the next frame arrived may be
// tried again.
func TestRecvTimeout(t *testing.T) {
	client, server := tcpPair(t, newTestKey(t))
	server.SetDeadline(time.Now().Add(20 * time.Millisecond))
	if _, _, err := server.Recv(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Recv with nothing sent: %v, want a timeout", err)
	}
	server.SetDeadline(time.Time{})
	if err := client.Send(5, []byte("late")); err != nil {
		t.Fatal(err)
	}
	if kind, p, err := server.Recv(); err != nil || kind != 5 || string(p) != "late" {
		t.Errorf("Recv after a timeout = %d, %q, %v; want 5, \"late\"", kind, p, err)
	}
}

// After the peer closes, Recv says so, and Send fails once the peer is
// gone; after Close, both fail.
func TestClosed(t *testing.T) {
	client, server := tcpPair(t, newTestKey(t))
	client.Close()
	if _, _, err := server.Recv(); err == nil || !strings.Contains(err.Error(), "closed the connection") {
		t.Errorf("Recv from a closed peer: %v", err)
	}
	server.Close()
	if err := server.Send(1, nil); err == nil {
		t.Error("Send on a closed Conn succeeded")
	}
}

func TestOneLine(t *testing.T) {
	tests := []struct{ in, want string }{
		{"plain", "plain"},
		{"two\nlines\n", "two lines"},
		{"tab\there\r\n", "tab here"},
		{"bad \xff utf-8", "bad \uFFFD utf-8"},
		{"\x1b[31mred", "[31mred"},
	}
	for _, tc := range tests {
		if got := oneLine(tc.in); got != tc.want {
			t.Errorf("oneLine(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// FuzzRecv feeds a Conn frames that may have been changed on the way:
// Recv must never panic and never return a payload other than one that
// was sent.
func FuzzRecv(f *testing.F) {
	var k sessionKeys
	copy(k.seal[:], "0123456789abcdef0123456789abcdef")
	k.open = k.seal
	sealed := func(kind uint16, payloads ...[]byte) []byte {
		var out []byte
		s, _ := newConn(&fakeConn{}, "", &k)
		for _, p := range payloads {
			hdr := binary.BigEndian.AppendUint32(nil, uint32(len(p)))
			hdr = binary.BigEndian.AppendUint16(hdr, kind)
			binary.BigEndian.PutUint64(s.wnonce[4:], s.wseq)
			s.wseq++
			out = append(out, s.seal.Seal(hdr, s.wnonce[:], p, hdr)...)
		}
		return out
	}
	f.Add(sealed(1, []byte("hello"), []byte("world")))
	f.Add(sealed(KindError, []byte("boom")))
	f.Add(sealed(2, nil))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		c, err := newConn(&fakeConn{in: in}, "fuzz", &k)
		if err != nil {
			t.Fatal(err)
		}
		for range 4 {
			kind, p, err := c.Recv()
			if err != nil {
				var remote *RemoteError
				if !errors.As(err, &remote) {
					return
				}
			}
			ok := (kind == 1 && (string(p) == "hello" || string(p) == "world")) ||
				(kind == KindError && string(p) == "boom") || (kind == 2 && len(p) == 0)
			if !ok {
				t.Fatalf("Recv returned kind %d, %q: never sent", kind, p)
			}
		}
	})
}
