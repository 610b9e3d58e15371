package wire

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"
)

func TestWrongKey(t *testing.T) {
	for _, transport := range []string{"pipe", "tcp"} {
		t.Run(transport, func(t *testing.T) {
			var a, b net.Conn
			if transport == "pipe" {
				a, b = net.Pipe()
			} else {
				a, b = tcpConns(t)
			}
			c, s := shake(t, a, b, newTestKey(t), newTestKey(t))
			if !isAuth(c.err) {
				t.Errorf("client: %v, want an error matching ErrAuth", c.err)
			}
			if !isAuth(s.err) {
				t.Errorf("server: %v, want an error matching ErrAuth", s.err)
			}
			for _, err := range []error{c.err, s.err} {
				if err != nil && !strings.Contains(err.Error(), "key files differ") {
					t.Errorf("error %q does not say that the key files differ", err)
				}
			}
		})
	}
}

// A key too short for LoadKey to return is refused before anything is
// sent.
func TestShortKey(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	_, err := Client(context.Background(), a, make([]byte, 31))
	if err == nil || !strings.Contains(err.Error(), "too short") {
		t.Errorf("Client with a 31-byte key: %v, want an error saying it is too short", err)
	}
	if _, err := a.Write([]byte{0}); !errors.Is(err, io.ErrClosedPipe) {
		t.Errorf("Client did not close its connection after failing: %v", err)
	}
}

// Strangers that connect to the server and send anything but a
// handshake with the key make Handshake fail quickly, learn nothing but
// a random nonce (only after a well-formed hello), and make it allocate
// nothing for what they claim.
func TestHandshakeRefusesStrangers(t *testing.T) {
	key := newTestKey(t)
	var nonce [nonceLen]byte
	goodHello := hello(roleClient, &nonce)
	garbage := make([]byte, 1<<20)
	if _, err := rand.Read(garbage); err != nil {
		t.Fatal(err)
	}
	withVersion := func(v byte) []byte { h := goodHello; h[len(magic)] = v; return h[:] }
	withRole := func(r byte) []byte { h := goodHello; h[len(magic)+1] = r; return h[:] }
	// hugeFrame is a frame header claiming 4 GiB, where the proof belongs.
	hugeFrame := append(bytes.Clone(goodHello[:]), 0xff, 0xff, 0xff, 0xff, 0, 1)
	hugeFrame = append(hugeFrame, garbage[:1000]...)

	tests := []struct {
		name     string
		send     []byte
		hangOn   bool // keep the connection open after sending, rather than closing it
		wantAuth bool
		wantSays string
		answered bool // a server hello is what the stranger may get back
	}{
		{name: "random garbage", send: garbage, wantAuth: true, wantSays: "does not speak cryo's wire protocol"},
		{name: "an HTTP request", send: []byte("GET / HTTP/1.1\r\nHost: node1:7000\r\nAccept: */*\r\n\r\n"), hangOn: true, wantAuth: true},
		{name: "nothing, then hang up", send: nil},
		{name: "nothing, and hang on", send: nil, hangOn: true, wantSays: "timeout"},
		{name: "truncated hello, then hang up", send: goodHello[:20], wantSays: "unexpected EOF"},
		{name: "truncated hello, and hang on", send: goodHello[:20], hangOn: true, wantSays: "timeout"},
		{name: "hello, then hang up", send: goodHello[:], answered: true, wantSays: "EOF"},
		{name: "hello, and hang on", send: goodHello[:], hangOn: true, answered: true, wantSays: "timeout"},
		{name: "hello and a truncated proof", send: append(bytes.Clone(goodHello[:]), 1, 2, 3), answered: true, wantSays: "unexpected EOF"},
		{name: "hello and a wrong proof", send: append(bytes.Clone(goodHello[:]), make([]byte, proofLen)...), hangOn: true, answered: true, wantAuth: true},
		{name: "hello and a huge frame", send: hugeFrame, hangOn: true, answered: true, wantAuth: true},
		{name: "hello and 1 MiB of garbage", send: append(bytes.Clone(goodHello[:]), garbage...), answered: true, wantAuth: true},
		{name: "another version", send: withVersion(2), hangOn: true, wantAuth: true, wantSays: "version 2"},
		{name: "a server's hello", send: withRole(roleServer), hangOn: true, wantAuth: true, wantSays: "is a server, not a client"},
		{name: "an unknown role", send: withRole('X'), hangOn: true, wantAuth: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			stranger, accepted := tcpConns(t)
			go func() {
				_, _ = stranger.Write(tc.send)
				if !tc.hangOn {
					_ = stranger.(*net.TCPConn).CloseWrite()
				}
			}()
			got := make(chan []byte, 1)
			go func() {
				b, _ := io.ReadAll(stranger) // until the server closes
				got <- b
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			start := time.Now()
			c, err := Handshake(ctx, accepted, key)
			took := time.Since(start)
			if err == nil {
				c.Close()
				t.Fatal("Handshake with a stranger succeeded")
			}
			checkOneLine(t, err)
			if took > 2*time.Second {
				t.Errorf("Handshake took %v to fail", took)
			}
			if isAuth(err) != tc.wantAuth {
				t.Errorf("Handshake: %v; matches ErrAuth: %v, want %v", err, isAuth(err), tc.wantAuth)
			}
			if !strings.Contains(err.Error(), tc.wantSays) {
				t.Errorf("Handshake: %v, want it to say %q", err, tc.wantSays)
			}
			// The server closed its end: the stranger's read ends.
			var answer []byte
			select {
			case answer = <-got:
			case <-time.After(5 * time.Second):
				t.Fatal("the server did not close the connection")
			}
			switch {
			case !tc.answered && len(answer) > 0:
				t.Errorf("the stranger got %d bytes back, want none", len(answer))
			case len(answer) > helloLen:
				t.Errorf("the stranger got %d bytes back, more than a hello", len(answer))
			case len(answer) > 0:
				// Possibly cut short by the reset of a close with unread data.
				if !bytes.HasPrefix(answer, []byte(magic)[:min(len(answer), len(magic))]) {
					t.Errorf("the stranger got %q back, want a server hello", answer)
				}
			}
		})
	}
}

// What a stranger makes the server allocate does not depend on what it
// sends, and is little: the handshake's fixed buffers (about 400 bytes),
// the context's AfterFunc, the error, and for a well-formed hello one
// crypto/hmac HMAC (about 650 bytes) to check the proof with.
func TestHandshakeAllocatesLittle(t *testing.T) {
	key := newTestKey(t)
	var nonce [nonceLen]byte
	h := hello(roleClient, &nonce)
	huge := make([]byte, 64<<20)
	for i := range huge {
		huge[i] = 0xff
	}
	inputs := map[string][]byte{
		"garbage":               huge,
		"hello and wrong proof": append(h[:], make([]byte, proofLen)...),
		"hello and huge frame":  append(h[:], huge...),
		"truncated hello":       h[:10],
	}
	for name, in := range inputs {
		t.Run(name, func(t *testing.T) {
			fc := &fakeConn{in: in}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			run := func() {
				fc.reset()
				if c, err := Handshake(ctx, fc, key); err == nil {
					c.Close()
					t.Fatal("Handshake with a stranger succeeded")
				}
			}
			const runs = 200
			run() // warm up
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			for range runs {
				run()
			}
			runtime.ReadMemStats(&after)
			perRun := (after.TotalAlloc - before.TotalAlloc) / runs
			t.Logf("%d bytes in %d allocations per failed handshake", perRun, (after.Mallocs-before.Mallocs)/runs)
			if perRun > 2048 {
				t.Errorf("a failed handshake allocates %d bytes, want at most 2048", perRun)
			}
			if fc.off > helloLen+proofLen {
				t.Errorf("Handshake read %d bytes, more than a hello and a proof", fc.off)
			}
			if !fc.closed {
				t.Error("Handshake left the connection open")
			}
		})
	}
}

// Two clients connected to each other both fail: each sees the other's
// hello name the wrong role.
func TestClientToClient(t *testing.T) {
	key := newTestKey(t)
	a, b := tcpConns(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := Client(ctx, b, key)
		done <- err
	}()
	_, err := Client(ctx, a, key)
	for i, err := range []error{err, <-done} {
		if !isAuth(err) || !strings.Contains(err.Error(), "is a client, not a server") {
			t.Errorf("client %d: %v, want an error matching ErrAuth that says the peer is a client", i, err)
		}
	}
}

// A client facing something without the key that reflects its own
// messages back (its nonce as the server's, or its proof as the server's)
// fails.
func TestReflectedHandshake(t *testing.T) {
	tests := []struct {
		name      string
		sameNonce bool // reflect the client's nonce as the server's
	}{
		{name: "own nonce reflected", sameNonce: true},
		{name: "own proof reflected", sameNonce: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, b := tcpConns(t)
			go func() {
				var in [helloLen]byte
				if _, err := io.ReadFull(b, in[:]); err != nil {
					return
				}
				var ns [nonceLen]byte
				if tc.sameNonce {
					copy(ns[:], in[helloLen-nonceLen:])
				} else if _, err := rand.Read(ns[:]); err != nil {
					return
				}
				out := hello(roleServer, &ns)
				if _, err := b.Write(out[:]); err != nil {
					return
				}
				var proof [proofLen]byte
				if _, err := io.ReadFull(b, proof[:]); err != nil {
					return
				}
				_, _ = b.Write(proof[:]) // the client's proof, as if it were the server's
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := Client(ctx, a, newTestKey(t))
			if err == nil {
				c.Close()
				t.Fatal("Client accepted its own messages reflected back")
			}
			if !isAuth(err) {
				t.Errorf("Client: %v, want an error matching ErrAuth", err)
			}
		})
	}
}

// Replaying what a client with the key sent in one handshake does not
// pass a later one: the server's nonce differs.
func TestReplayedHandshake(t *testing.T) {
	key := newTestKey(t)
	var recorded bytes.Buffer
	cc, pc := net.Pipe()
	ps, sc := net.Pipe()
	t.Cleanup(func() { pc.Close(); ps.Close() })
	go func() { _, _ = io.Copy(pc, ps) }()
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		_, _ = io.Copy(io.MultiWriter(ps, &recorded), io.LimitReader(pc, int64(helloLen+proofLen)))
	}()
	c, s := mustShake(t, cc, sc, key)
	c.Close()
	s.Close()
	<-copied
	if recorded.Len() != helloLen+proofLen {
		t.Fatalf("recorded %d bytes of the client's handshake, want %d", recorded.Len(), helloLen+proofLen)
	}

	replayer, accepted := tcpConns(t)
	go func() {
		_, _ = replayer.Write(recorded.Bytes())
		_, _ = io.Copy(io.Discard, replayer)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := Handshake(ctx, accepted, key)
	if err == nil {
		conn.Close()
		t.Fatal("a replayed handshake was accepted")
	}
	if !isAuth(err) {
		t.Errorf("Handshake: %v, want an error matching ErrAuth", err)
	}
}

// A cancelled context ends a handshake that waits on its peer at once.
func TestHandshakeCancelled(t *testing.T) {
	_, b := tcpConns(t)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	start := time.Now()
	_, err := Handshake(ctx, b, newTestKey(t))
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Handshake: %v, want an error matching context.Canceled", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("Handshake took %v to notice its context was cancelled", took)
	}
}

func TestDial(t *testing.T) {
	key := newTestKey(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	served := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			served <- err
			return
		}
		conn, err := Handshake(context.Background(), c, key)
		if err != nil {
			served <- err
			return
		}
		defer conn.Close()
		var v struct{ N int }
		if err := conn.RecvJSON(7, &v); err != nil {
			served <- err
			return
		}
		served <- conn.SendJSON(8, struct{ N int }{v.N + 1})
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, l.Addr().String(), key)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer c.Close()
	if c.Remote() != l.Addr().String() {
		t.Errorf("Remote() = %q, want %q", c.Remote(), l.Addr())
	}
	if err := c.SendJSON(7, struct{ N int }{41}); err != nil {
		t.Fatal(err)
	}
	var v struct{ N int }
	if err := c.RecvJSON(8, &v); err != nil || v.N != 42 {
		t.Errorf("RecvJSON: %+v, %v; want N 42", v, err)
	}
	if err := <-served; err != nil {
		t.Errorf("server: %v", err)
	}

	// Nothing listening.
	addr := l.Addr().String()
	l.Close()
	if c, err := Dial(ctx, addr, key); err == nil {
		c.Close()
		t.Error("Dial to a closed port succeeded")
	} else if !strings.Contains(err.Error(), addr) {
		t.Errorf("Dial: %v, want an error naming %s", err, addr)
	}
}

// FuzzHandshake feeds the server whatever a stranger might send: it must
// never succeed, never panic, read at most a hello and a proof, and send
// at most its hello.
func FuzzHandshake(f *testing.F) {
	var nonce [nonceLen]byte
	h := hello(roleClient, &nonce)
	f.Add(h[:])
	f.Add(append(h[:], make([]byte, proofLen)...))
	f.Add([]byte("cryowire"))
	f.Add([]byte{})
	key := bytes.Repeat([]byte{'k'}, 32)
	f.Fuzz(func(t *testing.T, in []byte) {
		fc := &fakeConn{in: in}
		c, err := Handshake(context.Background(), fc, key)
		if err == nil {
			c.Close()
			t.Fatal("Handshake succeeded without the key")
		}
		if fc.off > helloLen+proofLen || fc.wrote > helloLen || !fc.closed {
			t.Fatalf("Handshake read %d bytes, wrote %d, closed: %v", fc.off, fc.wrote, fc.closed)
		}
	})
}
