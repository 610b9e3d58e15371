package criu

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	streamer "github.com/checkpoint-restore/go-criu/v7/crit/images/img-streamer"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// ImageSource serves a streamed restore's images by name, the way
// criu-image-streamer would: CRIU asks for each image as it needs it and
// reads it, once, from a pipe.
type ImageSource interface {
	// Has tells whether the generation holds the image.
	Has(name string) bool
	// Send writes the whole image to w. An error ends the restore: CRIU
	// reads a short image and gives up before the job runs.
	Send(ctx context.Context, name string, w io.Writer) error
}

// streamSocket is where CRIU, restoring with --stream, looks for the image
// streamer (criu/img-streamer.c).
const streamSocket = "streamer-serve.sock"

// RestoreStreamed is Restore with the images served by src over CRIU's
// image-streamer protocol instead of read from files: pages go from the
// store straight into the restored memory, never through a file. CRIU's
// RPC mode has no streaming, so this runs `criu restore --stream` itself.
// o.ImagesDir must exist (the streamer socket lives there); LazyPages and
// notifications are not available this way.
func RestoreStreamed(ctx context.Context, b Binary, o Options, src ImageSource) (int, error) {
	if o.LazyPages {
		return 0, errors.New("criu restore: lazy pages cannot be streamed")
	}
	if o.LogFile == "" {
		o.LogFile = "restore.log"
	}
	work := o.WorkDir
	if work == "" {
		work = o.ImagesDir
	}
	sock := filepath.Join(o.ImagesDir, streamSocket)
	_ = os.Remove(sock)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return 0, fmt.Errorf("image streamer: %w", err)
	}
	defer ln.Close()
	ln.SetUnlinkOnClose(true)

	pidfile := filepath.Join(work, "restore.pid")
	_ = os.Remove(pidfile)
	b.fit(&o)
	args, extra := o.cmdline("restore")
	args = append(args, "--stream", "--pidfile", pidfile)
	cmd := exec.Command(b.Path, args...)
	cmd.ExtraFiles = extra
	var stderr limitedBuffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: o.RestoreDetached}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start %s restore: %w", b.Path, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	// Cancellation as in swrk: SIGTERM, then SIGKILL after 10 s.
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- serveImages(sctx, ln, src) }()

	var werr, serr error
	select {
	case werr = <-exited:
		// CRIU is done (or never connected): the service has nothing left
		// to do.
		cancel()
		serr = <-served
	case serr = <-served:
		if serr != nil {
			// A broken image: CRIU sees a short read and unwinds; make
			// sure it does not wait for us.
			_ = cmd.Process.Signal(syscall.SIGTERM)
		}
		werr = waitCRIU(ctx, cmd, exited)
	case <-ctx.Done():
		_ = cmd.Process.Signal(syscall.SIGTERM)
		werr = waitCRIU(context.Background(), cmd, exited)
		cancel()
		serr = <-served
		werr = fmt.Errorf("%w (%v)", ctx.Err(), werr)
	}
	if serr != nil && werr != nil && !errors.Is(serr, errStreamBroken) {
		// The image's own error says what is wrong; CRIU's is its echo.
		return 0, serr
	}
	// Else CRIU failed, and broke the stream off: its error says why.
	// A CRIU that restored the job read every byte it needed, and each
	// was verified before it was sent: an error sending what it did not
	// read does not undo that.
	if werr != nil {
		if s := strings.TrimSpace(stderr.String()); s != "" {
			werr = fmt.Errorf("%w; criu: %s", werr, lastLines(s, 3))
		}
		return 0, o.explain(fmt.Errorf("criu restore failed: %w", werr))
	}
	pb, err := os.ReadFile(pidfile)
	if err != nil {
		return 0, fmt.Errorf("criu restore: no pidfile: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(pb)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("criu restore: bad pidfile %q", pb)
	}
	return pid, nil
}

func waitCRIU(ctx context.Context, cmd *exec.Cmd, exited chan error) error {
	select {
	case err := <-exited:
		return err
	case <-ctx.Done():
		_ = cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case err := <-exited:
		return err
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		return <-exited
	}
}

// serveImages answers CRIU's image requests on ln until CRIU says it needs
// no more (it closes the connection) and every image sent has been written.
// Each request is a length-prefixed ImgStreamerRequestEntry naming a file;
// the answer a length-prefixed ImgStreamerReplyEntry; if the file exists,
// CRIU then passes the write end of a pipe (SCM_RIGHTS, one byte of data)
// and reads the image from the other end.
// errStreamBroken marks a stream that ended because CRIU went away in the
// middle of it (it failed for a reason of its own, which its error gives),
// as opposed to an image that could not be sent.
var errStreamBroken = errors.New("CRIU broke the image stream off")

func serveImages(ctx context.Context, ln *net.UnixListener, src ImageSource) error {
	type accepted struct {
		c   *net.UnixConn
		err error
	}
	ch := make(chan accepted, 1)
	go func() {
		c, err := ln.AcceptUnix()
		ch <- accepted{c, err}
	}()
	var conn *net.UnixConn
	select {
	case a := <-ch:
		if a.err != nil {
			return fmt.Errorf("image streamer: accept: %w", a.err)
		}
		conn = a.c
	case <-ctx.Done():
		ln.Close() // CRIU is gone before it asked for anything
		if a := <-ch; a.c != nil {
			a.c.Close()
		}
		return nil
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
	defer stop()

	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	defer wg.Wait()
	fail := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
		// The other images are no use now.
		_ = conn.SetDeadline(time.Now())
	}
	firstErr := func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(errs) > 0 {
			return errs[0]
		}
		return nil
	}
	for {
		var req streamer.ImgStreamerRequestEntry
		if err := readMsg(conn, &req); err != nil {
			if errors.Is(err, io.EOF) {
				wg.Wait()
				return firstErr() // CRIU dismissed the streamer
			}
			if ferr := firstErr(); ferr != nil {
				wg.Wait()
				return ferr
			}
			if ctx.Err() != nil {
				return nil // CRIU exited; its own error says why
			}
			return fmt.Errorf("image streamer: read request: %w (%w)", errStreamBroken, err)
		}
		name := req.GetFilename()
		ok := validImageName(name) && src.Has(name)
		if err := writeMsg(conn, &streamer.ImgStreamerReplyEntry{Exists: proto.Bool(ok)}); err != nil {
			return fmt.Errorf("image streamer: answer for %s: %w (%w)", name, errStreamBroken, err)
		}
		if !ok {
			continue
		}
		pipe, err := recvFile(conn, name)
		if err != nil {
			if ferr := firstErr(); ferr != nil {
				return ferr
			}
			return fmt.Errorf("image streamer: pipe for %s: %w (%w)", name, errStreamBroken, err)
		}
		// Bigger pipes mean fewer wakeups per MiB; the kernel may refuse.
		_, _ = unix.FcntlInt(pipe.Fd(), unix.F_SETPIPE_SZ, 1<<20)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer pipe.Close()
			// EPIPE: CRIU closed the pipe, having read what it needed.
			if err := src.Send(ctx, name, pipe); err != nil && !errors.Is(err, syscall.EPIPE) {
				fail(err)
			}
		}()
	}
}

// validImageName keeps requests inside the generation: CRIU asks for plain
// file names.
func validImageName(name string) bool {
	return name != "" && !strings.ContainsAny(name, "/\x00") && name != "." && name != ".."
}

func readMsg(r io.Reader, m proto.Message) error {
	var n [4]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return err
	}
	size := binary.LittleEndian.Uint32(n[:])
	if size > 1<<20 {
		return fmt.Errorf("request of %d bytes", size)
	}
	b := make([]byte, size)
	if _, err := io.ReadFull(r, b); err != nil {
		return err
	}
	return proto.Unmarshal(b, m)
}

func writeMsg(w io.Writer, m proto.Message) error {
	b, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	_, err = w.Write(append(binary.LittleEndian.AppendUint32(nil, uint32(len(b))), b...))
	return err
}

// recvFile receives the one fd CRIU sends with a single byte of data.
func recvFile(c *net.UnixConn, name string) (*os.File, error) {
	buf := make([]byte, 1)
	oob := make([]byte, unix.CmsgSpace(4*4))
	_, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, err
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, m := range msgs {
		f, err := unix.ParseUnixRights(&m)
		if err == nil {
			fds = append(fds, f...)
		}
	}
	if len(fds) != 1 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("expected one fd, got %d", len(fds))
	}
	unix.CloseOnExec(fds[0])
	return os.NewFile(uintptr(fds[0]), "criu-image-"+name), nil
}

// LazyPagesDaemon is `criu lazy-pages` for a restore with o.LazyPages: it
// listens in o.WorkDir for the restore's userfaultfds and asks the page
// server at o.PageServer for every page. The caller starts and stops it.
func LazyPagesDaemon(b Binary, o Options) *exec.Cmd {
	o.LazyPages = false // the daemon serves them; the flag is the restore's
	b.fit(&o)
	if o.LogFile == "" {
		o.LogFile = "lazy-pages.log"
	}
	args, extra := o.cmdline("lazy-pages")
	cmd := exec.Command(b.Path, args...)
	cmd.ExtraFiles = extra
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	return cmd
}
