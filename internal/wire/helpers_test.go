package wire

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// newTestKey is a fresh random key.
func newTestKey(t testing.TB) []byte {
	t.Helper()
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

// result is one side's outcome of a handshake.
type result struct {
	conn *Conn
	err  error
}

// shake runs Client on a and Handshake on b at the same time, and closes
// the Conns that come out of it when the test ends.
func shake(t testing.TB, a, b net.Conn, clientKey, serverKey []byte) (client, server result) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan result, 1)
	go func() {
		c, err := Handshake(ctx, b, serverKey)
		done <- result{c, err}
	}()
	c, err := Client(ctx, a, clientKey)
	client = result{c, err}
	server = <-done
	for _, r := range []result{client, server} {
		if r.conn != nil {
			t.Cleanup(func() { r.conn.Close() })
		}
	}
	return client, server
}

// mustShake is shake that fails the test unless both sides succeed.
func mustShake(t testing.TB, a, b net.Conn, key []byte) (client, server *Conn) {
	t.Helper()
	c, s := shake(t, a, b, key, key)
	if c.err != nil || s.err != nil {
		t.Fatalf("handshake: client: %v; server: %v", c.err, s.err)
	}
	return c.conn, s.conn
}

// tcpConns is a connected pair of TCP connections over loopback; a dialed,
// b accepted.
func tcpConns(t testing.TB) (a, b net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			c = nil
		}
		accepted <- c
	}()
	a, err = net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b = <-accepted
	if b == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// tcpPair is a client and a server Conn over loopback TCP.
func tcpPair(t testing.TB, key []byte) (client, server *Conn) {
	t.Helper()
	a, b := tcpConns(t)
	return mustShake(t, a, b, key)
}

// frameEditor decides what the proxy forwards in place of the i-th frame
// (from 0) that the client sends after the handshake.
type frameEditor func(i int, frame []byte) [][]byte

// proxiedPair is a client and a server Conn connected through a proxy
// that copies the handshake as it is and hands each frame from the client
// to edit.
func proxiedPair(t testing.TB, key []byte, edit frameEditor) (client, server *Conn) {
	t.Helper()
	cc, pc := net.Pipe() // client - proxy
	ps, sc := net.Pipe() // proxy - server
	t.Cleanup(func() { cc.Close(); pc.Close(); ps.Close(); sc.Close() })
	go func() { // server to client, untouched
		_, _ = io.Copy(pc, ps)
		pc.Close()
	}()
	go func() { // client to server: the handshake, then frames through edit
		defer ps.Close()
		if _, err := io.CopyN(ps, pc, int64(helloLen+proofLen)); err != nil {
			return
		}
		for i := 0; ; i++ {
			hdr := make([]byte, headerLen)
			if _, err := io.ReadFull(pc, hdr); err != nil {
				return
			}
			body := make([]byte, int(binary.BigEndian.Uint32(hdr))+tagLen)
			if _, err := io.ReadFull(pc, body); err != nil {
				return
			}
			for _, f := range edit(i, append(hdr, body...)) {
				if _, err := ps.Write(f); err != nil {
					return
				}
			}
		}
	}()
	return mustShake(t, cc, sc, key)
}

// fakeConn is a net.Conn that reads from in, counts what is written to
// it, and allocates nothing: for measuring what a handshake allocates.
type fakeConn struct {
	in     []byte
	off    int
	wrote  int
	closed bool
}

type fakeAddr struct{}

func (fakeAddr) Network() string { return "fake" }
func (fakeAddr) String() string  { return "fake peer" }

func (f *fakeConn) Read(p []byte) (int, error) {
	if f.closed {
		return 0, net.ErrClosed
	}
	if f.off >= len(f.in) {
		return 0, io.EOF
	}
	n := copy(p, f.in[f.off:])
	f.off += n
	return n, nil
}

func (f *fakeConn) Write(p []byte) (int, error) {
	if f.closed {
		return 0, net.ErrClosed
	}
	f.wrote += len(p)
	return len(p), nil
}

func (f *fakeConn) Close() error {
	if f.closed {
		return net.ErrClosed
	}
	f.closed = true
	return nil
}

func (f *fakeConn) reset()                           { f.off, f.wrote, f.closed = 0, 0, false }
func (f *fakeConn) LocalAddr() net.Addr              { return fakeAddr{} }
func (f *fakeConn) RemoteAddr() net.Addr             { return fakeAddr{} }
func (f *fakeConn) SetDeadline(time.Time) error      { return nil }
func (f *fakeConn) SetReadDeadline(time.Time) error  { return nil }
func (f *fakeConn) SetWriteDeadline(time.Time) error { return nil }

// isAuth reports whether err matches ErrAuth, for messages.
func isAuth(err error) bool { return errors.Is(err, ErrAuth) }
