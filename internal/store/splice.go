package store

import (
	"context"
	"errors"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// A restore's page images go into CRIU's pipe with vmsplice(2): the pipe
// takes references to the pages of cryo's verified buffers instead of a
// copy of them, and the writer no longer holds the pipe's lock while it
// copies a megabyte, which the reading CRIU spent spinning on. A buffer's
// pages then belong to the pipe until the reader has read past them, so
// it is reused only after that: once a pipe's capacity has gone in after
// it (the pipe cannot hold more, so the reader must have taken it), or at
// the end, once FIONREAD (TIOCINQ) says nothing is left unread. FIONREAD
// takes the pipe's lock, which CRIU holds while it copies into the job's
// memory: asking after every chunk would contend for it.
//
// Only page images go this way. CRIU read(2)s them into the job's memory;
// other images it may splice onward (into a ghost file, say), where pages
// of ours would live on while we reused them.

// splicer writes buffers into the pipe fd, keeping each until it is read.
type splicer struct {
	fd      int
	size    int64     // the pipe's capacity
	total   int64     // bytes spliced so far
	held    []heldBuf // buffers whose pages may still be in the pipe, oldest first
	release func([]byte)
}

type heldBuf struct {
	b   []byte
	end int64 // total when its last byte went in
}

// newSplicer returns a splicer for w, or nil when w is not a pipe (which
// has no pipe size).
func newSplicer(w any, release func([]byte)) *splicer {
	f, ok := w.(*os.File)
	if !ok {
		return nil
	}
	fd := int(f.Fd())
	size, err := unix.FcntlInt(uintptr(fd), unix.F_GETPIPE_SZ, 0)
	if err != nil || size <= 0 {
		return nil
	}
	return &splicer{fd: fd, size: int64(size), release: release}
}

// write splices b into the pipe. owned buffers are released once read;
// others (the shared zero page) must simply never change.
func (s *splicer) write(b []byte, owned bool) error {
	for off := 0; off < len(b); {
		n, err := unix.Vmsplice(s.fd, []unix.Iovec{iovec(b[off:])}, 0)
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
			continue
		}
		if err != nil {
			return err // b, part of which may be in the pipe, is not reused
		}
		off += n
	}
	s.total += int64(len(b))
	if owned {
		s.held = append(s.held, heldBuf{b, s.total})
	}
	// Each page of the pipe holds at most a page of data: with size bytes
	// in after a buffer, its pages have all been read.
	s.releaseTo(s.total - s.size)
	return nil
}

// releaseTo releases the buffers whose last byte is at most at read.
func (s *splicer) releaseTo(read int64) {
	for len(s.held) > 0 && s.held[0].end <= read {
		s.release(s.held[0].b)
		s.held = s.held[1:]
	}
}

func iovec(b []byte) unix.Iovec {
	v := unix.Iovec{Base: &b[0]}
	v.SetLen(len(b))
	return v
}

// reap releases the buffers the reader has read past, by FIONREAD.
func (s *splicer) reap() {
	if unread, err := unix.IoctlGetInt(s.fd, unix.TIOCINQ); err == nil { // FIONREAD
		s.releaseTo(s.total - int64(unread))
	}
}

// finish waits until the reader has read everything or has closed its end
// (then nothing reads the pages any more), and releases the buffers. If ctx
// ends first, they are left to the garbage collector, never reused.
func (s *splicer) finish(ctx context.Context) {
	// The reader usually takes the last megabyte within milliseconds; one
	// that is slow costs polls that back off to 10 ms.
	wait := 100 * time.Microsecond
	for {
		s.reap()
		if len(s.held) == 0 {
			return
		}
		fds := []unix.PollFd{{Fd: int32(s.fd), Events: unix.POLLOUT}}
		if _, err := unix.Poll(fds, 0); err == nil && fds[0].Revents&unix.POLLERR != 0 {
			for _, h := range s.held {
				s.release(h.b)
			}
			s.held = nil
			return
		}
		select {
		case <-ctx.Done():
			s.held = nil
			return
		case <-time.After(wait):
			wait = min(2*wait, 10*time.Millisecond)
		}
	}
}
