package wire

import (
	"bufio"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"
)

// MaxPayload is the largest payload of one message.
const MaxPayload = 16 << 20

// KindError is the kind of a message that carries the peer's one-line
// error message (SendError); Recv returns it as a *RemoteError.
const KindError uint16 = 0xffff

const (
	headerLen = 6  // payload length (uint32), kind (uint16)
	tagLen    = 16 // AES-GCM's tag
	gcmNonce  = 12 // AES-GCM's nonce: 4 zero bytes, the frame counter
	readBuf   = 64 << 10
	// maxErrorMsg bounds the message of a KindError.
	maxErrorMsg = 4096
)

// RemoteError is the error message the peer sent with SendError.
type RemoteError struct{ Msg string }

func (e *RemoteError) Error() string { return "peer: " + e.Msg }

// Conn is an authenticated, encrypted connection to another cryo, made by
// Dial, Client or Handshake.
//
// Sends are serialized by a mutex, so several goroutines may Send; so are
// Recvs, but a payload returned by Recv is valid only until the next
// Recv, so one goroutine should receive. Sending and receiving may run at
// the same time. A Send that fails leaves the sending direction broken,
// and every later Send returns the same error (part of a frame may have
// been written). A Recv that fails breaks the receiving direction likewise,
// except one that times out (SetDeadline) before any byte of the next
// frame arrived, which may be retried. Close the Conn after an error.
type Conn struct {
	conn   net.Conn
	remote string

	wmu    sync.Mutex
	seal   cipher.AEAD
	wseq   uint64 // frames sent: the next frame's nonce
	wnonce [gcmNonce]byte
	wbuf   []byte // header and ciphertext of the frame being sent
	werr   error  // sticky

	rmu    sync.Mutex
	open   cipher.AEAD
	rseq   uint64 // frames received: the nonce the next frame must have
	rnonce [gcmNonce]byte
	r      *bufio.Reader
	rhdr   [headerLen]byte
	rbuf   []byte // ciphertext of the last frame received, then its payload
	rerr   error  // sticky

	sent, received atomic.Int64
}

// newConn makes the Conn for c after a handshake that yielded k.
func newConn(c net.Conn, remote string, k *sessionKeys) (*Conn, error) {
	seal, err := gcm(k.seal[:])
	if err != nil {
		return nil, err
	}
	open, err := gcm(k.open[:])
	if err != nil {
		return nil, err
	}
	conn := &Conn{
		conn:   c,
		remote: remote,
		seal:   seal,
		open:   open,
		r:      bufio.NewReaderSize(c, readBuf),
	}
	conn.sent.Store(k.sent)
	conn.received.Store(k.received)
	return conn, nil
}

func gcm(key []byte) (cipher.AEAD, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("AES: %w", err)
	}
	a, err := cipher.NewGCM(b)
	if err != nil {
		return nil, fmt.Errorf("AES-GCM: %w", err)
	}
	return a, nil
}

// Send sends one message of the given kind. The payload may be at most
// MaxPayload bytes; a longer one is refused before anything is sent, and
// the Conn stays usable. Send does not keep payload.
func (c *Conn) Send(kind uint16, payload []byte) error {
	if len(payload) > MaxPayload {
		return fmt.Errorf("sending a message of kind %d to %s: %d bytes, more than the %d of one message: split it", kind, c.remote, len(payload), MaxPayload)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		return c.werr
	}
	if c.wseq == math.MaxUint64 {
		// Never reached (2^64 frames), but a nonce must never repeat.
		c.werr = fmt.Errorf("sending to %s: the connection has used up its frame counter: reconnect", c.remote)
		return c.werr
	}
	n := headerLen + len(payload) + tagLen
	if cap(c.wbuf) < n {
		c.wbuf = make([]byte, n)
	}
	b := c.wbuf[:n]
	binary.BigEndian.PutUint32(b, uint32(len(payload)))
	binary.BigEndian.PutUint16(b[4:], kind)
	binary.BigEndian.PutUint64(c.wnonce[4:], c.wseq)
	c.seal.Seal(b[headerLen:headerLen], c.wnonce[:], payload, b[:headerLen])
	c.wseq++
	m, err := c.conn.Write(b)
	c.sent.Add(int64(m))
	if err != nil {
		c.werr = fmt.Errorf("sending a message of kind %d to %s: %w", kind, c.remote, err)
		return c.werr
	}
	return nil
}

// SendJSON sends v encoded as JSON in one message of the given kind.
func (c *Conn) SendJSON(kind uint16, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encoding a message of kind %d for %s: %w", kind, c.remote, err)
	}
	return c.Send(kind, b)
}

// SendError sends msg to the peer as a message of KindError, which the
// peer's Recv returns as a *RemoteError. msg is made one line (line
// breaks and other control characters become spaces) and cut to 4096
// bytes.
func (c *Conn) SendError(msg string) error {
	return c.Send(KindError, []byte(oneLine(msg)))
}

// Recv receives the next message. The payload is valid until the next
// Recv, which reuses its memory. A frame that does not verify (tampered
// with, replayed, reordered, or one before it dropped) returns an error
// matching ErrAuth, and the Conn can receive nothing more. A message of
// KindError is returned with its payload and a *RemoteError.
func (c *Conn) Recv() (kind uint16, payload []byte, err error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if c.rerr != nil {
		return 0, nil, c.rerr
	}
	n, err := io.ReadFull(c.r, c.rhdr[:])
	if err != nil {
		if n == 0 && errors.Is(err, os.ErrDeadlineExceeded) {
			// Nothing of the frame was consumed: the stream is intact.
			return 0, nil, fmt.Errorf("receiving from %s: %w", c.remote, err)
		}
		if n == 0 && errors.Is(err, io.EOF) {
			return 0, nil, c.fail(fmt.Errorf("receiving from %s: the peer closed the connection: %w", c.remote, err))
		}
		return 0, nil, c.fail(fmt.Errorf("receiving from %s: %w", c.remote, err))
	}
	c.received.Add(headerLen)
	size := binary.BigEndian.Uint32(c.rhdr[:4])
	kind = binary.BigEndian.Uint16(c.rhdr[4:])
	if size > MaxPayload {
		// No peer that holds the key sends this: the length was changed.
		return 0, nil, c.fail(fmt.Errorf("receiving from %s: %w: frame %d claims %d bytes, more than the %d of one message (the stream was tampered with)", c.remote, ErrAuth, c.rseq, size, MaxPayload))
	}
	m := int(size) + tagLen
	if cap(c.rbuf) < m {
		c.rbuf = make([]byte, m)
	}
	b := c.rbuf[:m]
	if _, err := io.ReadFull(c.r, b); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, c.fail(fmt.Errorf("receiving a message of kind %d and %d bytes from %s: %w", kind, size, c.remote, err))
	}
	c.received.Add(int64(m))
	binary.BigEndian.PutUint64(c.rnonce[4:], c.rseq)
	p, err := c.open.Open(b[:0], c.rnonce[:], b, c.rhdr[:])
	if err != nil {
		return 0, nil, c.fail(fmt.Errorf("receiving from %s: %w: frame %d does not verify: it was tampered with, replayed or reordered, or one before it was dropped", c.remote, ErrAuth, c.rseq))
	}
	c.rseq++
	if kind == KindError {
		return kind, p, &RemoteError{Msg: oneLine(string(p))}
	}
	return kind, p, nil
}

// fail makes err the receiving direction's sticky error.
func (c *Conn) fail(err error) error {
	c.rerr = err
	return err
}

// RecvJSON receives one message, which must be of kind want, and decodes
// its JSON payload into v (unknown fields are ignored). A message of
// another kind is an error naming both kinds (or the *RemoteError that a
// KindError is); it is consumed, and the Conn stays usable.
func (c *Conn) RecvJSON(want uint16, v any) error {
	kind, p, err := c.Recv()
	if err != nil {
		return err
	}
	if kind != want {
		return fmt.Errorf("receiving from %s: expected a message of kind %d, got one of kind %d (%d bytes)", c.remote, want, kind, len(p))
	}
	if err := json.Unmarshal(p, v); err != nil {
		return fmt.Errorf("decoding a message of kind %d from %s: %w", kind, c.remote, err)
	}
	return nil
}

// SetDeadline sets the read and write deadlines of the underlying
// connection (see net.Conn); the zero time clears them.
func (c *Conn) SetDeadline(t time.Time) error { return c.conn.SetDeadline(t) }

// Close closes the underlying connection; a Send or Recv blocked on it
// returns an error.
func (c *Conn) Close() error { return c.conn.Close() }

// Sent is the number of bytes written to the network so far, handshake
// and framing included. It may be called at any time, from any goroutine.
func (c *Conn) Sent() int64 { return c.sent.Load() }

// Received is the number of bytes of the handshake and of the frames
// received so far, framing included (not counting what was read ahead of
// them). It may be called at any time, from any goroutine.
func (c *Conn) Received() int64 { return c.received.Load() }

// Remote is the peer's address.
func (c *Conn) Remote() string { return c.remote }

// oneLine makes s one line of at most maxErrorMsg bytes of valid UTF-8.
func oneLine(s string) string {
	if len(s) > maxErrorMsg {
		cut := maxErrorMsg
		for i := maxErrorMsg; i > maxErrorMsg-utf8.UTFMax; i-- {
			if utf8.RuneStart(s[i]) { // cut before a rune, not within one
				cut = i
				break
			}
		}
		s = s[:cut]
	}
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	return strings.TrimSpace(s)
}
