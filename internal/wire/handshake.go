package wire

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"
)

// ErrAuth is what a failed authentication matches: the peer does not hold
// the same key, a handshake was replayed or reflected, the peer is no
// cryo of this protocol version, or a frame was tampered with, replayed,
// reordered or dropped.
var ErrAuth = errors.New("authentication failed")

const (
	protocol   = "cryo-wire/1" // the protocol's name and version in the transcript
	magic      = "cryowire"    // the first bytes of each hello
	version    = 1             // the byte after them
	roleClient = 'C'
	roleServer = 'S'
	nonceLen   = 32
	helloLen   = len(magic) + 2 + nonceLen
	proofLen   = sha256.Size

	// defaultHandshakeTimeout bounds a handshake (and Dial's connect)
	// whose context has no deadline, so that a peer that stops sending
	// cannot hold it forever.
	defaultHandshakeTimeout = 10 * time.Second
)

// Labels of the values derived from the key and the nonces (derive).
const (
	labelClientProof = "client proof"
	labelServerProof = "server proof"
	labelClientKey   = "client to server"
	labelServerKey   = "server to client"
)

// Dial connects to addr over TCP and runs the client side of the
// handshake with key. ctx bounds the connect and the handshake together
// (10 seconds if it has no deadline). On failure nothing is left open.
func Dial(ctx context.Context, addr string, key []byte) (*Conn, error) {
	if err := checkKey(key); err != nil {
		return nil, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultHandshakeTimeout)
		defer cancel()
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("connecting to cryo at %s: %w", addr, err)
	}
	return Client(ctx, c, key)
}

// Client runs the client side of the handshake with key on c, a
// connection to a peer that runs Handshake. ctx bounds it (10 seconds if
// it has no deadline). On success c belongs to the returned Conn, with no
// deadline set; on failure c is closed and the error matches ErrAuth when
// the server did not prove the key (or hung up instead, which is what a
// server does that did not accept this side's proof), or is the I/O
// error.
func Client(ctx context.Context, c net.Conn, key []byte) (*Conn, error) {
	return handshake(ctx, c, key, roleClient)
}

// Handshake runs the server side of the handshake with key on c, an
// accepted connection. ctx bounds it (10 seconds if it has no deadline).
// Before the client has proved the key, Handshake reads only fixed-size
// messages into fixed buffers and sends nothing but a random nonce. On
// success c belongs to the returned Conn, with no deadline set; on
// failure c is closed and the error matches ErrAuth or is the I/O error.
func Handshake(ctx context.Context, c net.Conn, key []byte) (*Conn, error) {
	return handshake(ctx, c, key, roleServer)
}

// checkKey refuses a key too short to be one LoadKey returns.
func checkKey(key []byte) error {
	if len(key) < minKeyLen {
		return fmt.Errorf("a key of %d bytes is too short (at least %d): load it with LoadKey", len(key), minKeyLen)
	}
	return nil
}

// sessionKeys are what a handshake yields besides the byte counts.
type sessionKeys struct {
	seal, open     [32]byte // this side's sending and receiving keys
	sent, received int64
}

// state is one handshake's: its buffers are fields, so that reading into
// them (which makes them escape) costs one allocation of fixed size.
type state struct {
	c       net.Conn
	key     []byte
	in, out [helloLen]byte
	proof   [proofLen]byte
	nc, ns  [nonceLen]byte
	t       [64 + 2*nonceLen]byte // derive's transcript: protocol, a label, the nonces
	k       sessionKeys
}

func handshake(ctx context.Context, c net.Conn, key []byte, role byte) (*Conn, error) {
	remote := addrString(c.RemoteAddr())
	fail := func(err error) (*Conn, error) {
		err = fmt.Errorf("handshake with %s: %w", remote, err)
		if cerr := c.Close(); cerr != nil && !errors.Is(cerr, net.ErrClosed) {
			err = errors.Join(err, fmt.Errorf("closing the connection to %s: %w", remote, cerr))
		}
		return nil, err
	}
	if err := checkKey(key); err != nil {
		return fail(err)
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(defaultHandshakeTimeout)
	}
	if err := c.SetDeadline(deadline); err != nil {
		return fail(err)
	}
	// A cancelled ctx interrupts the reads and writes below.
	stop := func() bool { return true }
	if ctx.Done() != nil {
		stop = context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	}

	s := &state{c: c, key: key}
	defer clear(s.t[:])
	var err error
	if role == roleClient {
		err = s.client()
	} else {
		err = s.server()
	}
	if !stop() {
		// ctx ended while the handshake ran; its AfterFunc may still be
		// moving the deadline, so the connection cannot be handed on.
		if err == nil {
			err = ctx.Err()
		} else {
			err = fmt.Errorf("%w: %w", ctx.Err(), err)
		}
	}
	if err == nil {
		err = c.SetDeadline(time.Time{})
	}
	var conn *Conn
	if err == nil {
		conn, err = newConn(c, remote, &s.k)
	}
	clear(s.k.seal[:])
	clear(s.k.open[:])
	if err != nil {
		return fail(err)
	}
	return conn, nil
}

// server runs the server's half of the handshake: it reads the client's
// hello, answers with its own, reads the client's proof and only if that
// verifies sends its own proof.
func (s *state) server() error {
	if _, err := io.ReadFull(s.c, s.in[:]); err != nil {
		return fmt.Errorf("reading the client's hello: %w", err)
	}
	s.k.received += int64(helloLen)
	if err := checkHello(&s.in, roleClient); err != nil {
		return err
	}
	copy(s.nc[:], s.in[helloLen-nonceLen:])
	if _, err := rand.Read(s.ns[:]); err != nil {
		return fmt.Errorf("no random bytes for a nonce: %w", err)
	}
	s.out = hello(roleServer, &s.ns)
	n, err := s.c.Write(s.out[:])
	s.k.sent += int64(n)
	if err != nil {
		return fmt.Errorf("sending the server's hello: %w", err)
	}
	if _, err := io.ReadFull(s.c, s.proof[:]); err != nil {
		return fmt.Errorf("reading the client's proof of the key: %w", err)
	}
	s.k.received += int64(proofLen)
	if want := s.derive(labelClientProof); !hmac.Equal(s.proof[:], want[:]) {
		return fmt.Errorf("%w: the client's proof of the key does not verify: the two nodes' key files differ (or a stranger connected)", ErrAuth)
	}
	s.proof = s.derive(labelServerProof)
	n, err = s.c.Write(s.proof[:])
	s.k.sent += int64(n)
	if err != nil {
		return fmt.Errorf("sending the server's proof of the key: %w", err)
	}
	s.k.seal = s.derive(labelServerKey)
	s.k.open = s.derive(labelClientKey)
	return nil
}

// client runs the client's half of the handshake: it sends its hello,
// reads the server's, sends its proof and checks the server's.
func (s *state) client() error {
	if _, err := rand.Read(s.nc[:]); err != nil {
		return fmt.Errorf("no random bytes for a nonce: %w", err)
	}
	s.out = hello(roleClient, &s.nc)
	n, err := s.c.Write(s.out[:])
	s.k.sent += int64(n)
	if err != nil {
		return fmt.Errorf("sending the client's hello: %w", err)
	}
	if _, err := io.ReadFull(s.c, s.in[:]); err != nil {
		if hungUp(err) {
			return fmt.Errorf("the server hung up instead of answering (a cryo of another version, or not cryo at all?): %w", err)
		}
		return fmt.Errorf("reading the server's hello: %w", err)
	}
	s.k.received += int64(helloLen)
	if err := checkHello(&s.in, roleServer); err != nil {
		return err
	}
	copy(s.ns[:], s.in[helloLen-nonceLen:])
	if s.ns == s.nc {
		return fmt.Errorf("%w: the server's nonce is this side's own: the handshake is being reflected", ErrAuth)
	}
	s.proof = s.derive(labelClientProof)
	n, err = s.c.Write(s.proof[:])
	s.k.sent += int64(n)
	if err != nil {
		return fmt.Errorf("sending the client's proof of the key: %w", err)
	}
	if _, err := io.ReadFull(s.c, s.proof[:]); err != nil {
		if hungUp(err) {
			return fmt.Errorf("%w: the server hung up instead of proving the key, as it does when this side's proof fails: the two nodes' key files differ (%w)", ErrAuth, err)
		}
		return fmt.Errorf("reading the server's proof of the key: %w", err)
	}
	s.k.received += int64(proofLen)
	if want := s.derive(labelServerProof); !hmac.Equal(s.proof[:], want[:]) {
		return fmt.Errorf("%w: the server's proof of the key does not verify: the two nodes' key files differ (or something else answers at this address)", ErrAuth)
	}
	s.k.seal = s.derive(labelClientKey)
	s.k.open = s.derive(labelServerKey)
	return nil
}

// derive is HMAC-SHA256 keyed with the pre-shared key over the transcript
// protocol 0x00 label 0x00 nc ns: a proof of the key for one role, or one
// direction's session key, depending on label.
func (s *state) derive(label string) [sha256.Size]byte {
	b := append(s.t[:0], protocol...)
	b = append(b, 0)
	b = append(b, label...)
	b = append(b, 0)
	b = append(b, s.nc[:]...)
	b = append(b, s.ns[:]...)
	h := hmac.New(sha256.New, s.key)
	h.Write(b)
	var out [sha256.Size]byte
	h.Sum(out[:0])
	return out
}

// hello is the first message of a side of the given role.
func hello(role byte, nonce *[nonceLen]byte) [helloLen]byte {
	var b [helloLen]byte
	copy(b[:], magic)
	b[len(magic)] = version
	b[len(magic)+1] = role
	copy(b[len(magic)+2:], nonce[:])
	return b
}

// checkHello checks that b is the hello of a peer of role want that
// speaks this version.
func checkHello(b *[helloLen]byte, want byte) error {
	if string(b[:len(magic)]) != magic {
		return fmt.Errorf("%w: the peer does not speak cryo's wire protocol", ErrAuth)
	}
	if v := b[len(magic)]; v != version {
		return fmt.Errorf("%w: the peer speaks version %d of cryo's wire protocol, this cryo version %d: run the same cryo release on both nodes", ErrAuth, v, version)
	}
	if r := b[len(magic)+1]; r != want {
		return fmt.Errorf("%w: the peer is a %s, not a %s (two clients connected to each other, or a reflected handshake)", ErrAuth, roleName(r), roleName(want))
	}
	return nil
}

func roleName(r byte) string {
	switch r {
	case roleClient:
		return "client"
	case roleServer:
		return "server"
	}
	return fmt.Sprintf("peer of unknown role %#02x", r)
}

// hungUp tells whether err says the peer closed the connection.
func hungUp(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// addrString is a remote address for messages.
func addrString(a net.Addr) string {
	if a == nil {
		return "an unknown peer"
	}
	return a.String()
}
