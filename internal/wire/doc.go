// Package wire carries authenticated, encrypted, framed messages between
// two cryo processes on different nodes over TCP: a job's memory moved
// by live migration, a checkpoint streamed to a standby node. Both sides
// run as the user, not root, and hold copies of the same pre-shared key
// file.
//
// It owns: the key file (LoadKey's checks, NewKey's format), the
// handshake, and the framing and sealing of messages. It must not know
// what messages mean (kinds and payloads are the caller's), listen or
// accept (callers own their listeners and hand accepted connections to
// Handshake), touch the store, or print; and it runs nothing in the
// background: a Conn works in its caller's Send and Recv.
//
// # Key file
//
// A key file is a regular file of the user's own, mode 0600 or stricter,
// whose contents without surrounding ASCII whitespace (32 to 4096 bytes,
// any bytes) are the key. NewKey writes 32 random bytes as 64 hex digits
// and a newline; the hex text itself is the key, it is not decoded.
//
// # Handshake
//
// Every message of the handshake has a fixed size, so nothing is
// allocated for what a stranger sends. In order (C client, S server):
//
//	C -> S  hello:  "cryowire" | version (1) | role 'C' | Nc (32 random bytes)   42 bytes
//	S -> C  hello:  "cryowire" | version (1) | role 'S' | Ns (32 random bytes)   42 bytes
//	C -> S  proof:  HMAC-SHA256(K, T("client proof"))                             32 bytes
//	S -> C  proof:  HMAC-SHA256(K, T("server proof"))                             32 bytes
//
// where K is the pre-shared key and T(label) = "cryo-wire/1" 0x00 label
// 0x00 Nc Ns. The server answers a hello of the wrong magic, version or
// role with nothing but closing the connection; to a client that sent a
// well-formed hello it reveals only its random nonce until the client's
// proof verifies, and closes the connection if it does not. Its own proof
// goes only to a client that proved the key. Fresh nonces on both sides
// make a recorded handshake useless against a new one (the peer's nonce
// differs), and the role in every label makes a client's proof worthless
// as a server's (a reflected handshake fails; so does one client
// connected to another: the hello names the role). Both proofs are
// compared in constant time. Unless its context says otherwise a
// handshake must finish within 10 seconds.
//
// Each direction then has its own AES-256 key,
//
//	client to server: HMAC-SHA256(K, T("client to server"))
//	server to client: HMAC-SHA256(K, T("server to client"))
//
// so the keys of every session are fresh, and differ from the proofs
// sent in the clear.
//
// # Frames
//
// Every message after the handshake is one frame:
//
//	length (uint32, big endian) | kind (uint16, big endian) | AES-256-GCM ciphertext of length bytes | tag (16 bytes)
//
// The 6-byte header is the additional data of the seal, so neither the
// kind nor the length can be changed unnoticed. The GCM nonce is 4 zero
// bytes and a per-direction 64-bit counter of frames (big endian),
// starting at 0, which each side keeps on its own: a replayed, reordered
// or dropped frame is opened with the wrong nonce and fails as a tampered
// one does, with ErrAuth, and the Conn is unusable after it. A length
// above MaxPayload, which no peer with the key sends, is refused the same
// way before anything is allocated for it. Kind
// KindError carries a peer's one-line error message (SendError,
// RemoteError).
//
// A Conn seals straight from the caller's payload into one buffer that
// it reuses and writes header and ciphertext with one Write; it reads
// into one reused buffer and opens the frame in place, so a payload
// returned by Recv is valid until the next Recv.
package wire
