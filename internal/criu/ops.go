package criu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"google.golang.org/protobuf/proto"
)

// ptr returns a pointer to v, for protobuf optional fields.
func ptr[T any](v T) *T { return &v }

// Options is everything cryo asks of CRIU for one dump or restore. It is
// translated to CRIU's RPC options in exactly one place (rpcOpts).
type Options struct {
	ImagesDir string // where images are written (dump) or read (restore)
	WorkDir   string // where CRIU writes its log; ImagesDir when empty
	LogFile   string // log file name inside WorkDir, e.g. "dump.log"
	LogLevel  int    // 0-4; 4 is CRIU's debug level (default)

	// Dump only.
	Pid          int  // root of the tree to dump
	LeaveRunning bool // resume the tree after the dump
	LeaveStopped bool // leave the tree stopped (SIGSTOP) after the dump
	// PageServer, when set, sends memory pages to a page server at this
	// loopback address instead of writing pages-*.img locally.
	PageServer *PageServerAddr

	// Restore only.
	RestoreSibling  bool // restored root becomes a child of the caller
	RestoreDetached bool // restore into a new session, away from our terminal
	// LazyPages leaves the pages marked lazy in the images to CRIU's
	// lazy-pages daemon, which must be listening in WorkDir.
	LazyPages bool

	// Both.
	TCPEstablished bool // checkpoint/restore established TCP connections
	ShellJob       bool // allow a tree whose session leader is outside it
	FileLocks      bool
	ExtUnixSockets bool
	// External resources, in CRIU's --external syntax.
	External []string
	// InheritFds maps a CRIU resource key (e.g. "pipe:[1234]") to a file that
	// the restored tree receives in its place.
	InheritFds map[string]*os.File
	Timeout    int // seconds CRIU may spend freezing; 0 for CRIU's default
	// FreezeCgroup is a cgroup v1 freezer holding exactly the tree, which
	// CRIU freezes (or finds frozen and leaves so) instead of stopping the
	// tasks one by one.
	FreezeCgroup string
}

// PageServerAddr is where a dump sends its pages: a connected stream
// socket handed to CRIU (File), or a TCP address.
type PageServerAddr struct {
	File    *os.File
	Address string
	Port    int32
}

// rpcOpts translates o into CRIU's RPC options, opening the images and work
// directories; the caller closes the returned files after the RPC.
func (o Options) rpcOpts() (*rpc.CriuOpts, []*os.File, error) {
	imgDir, err := os.Open(o.ImagesDir)
	if err != nil {
		return nil, nil, fmt.Errorf("open images dir: %w", err)
	}
	files := []*os.File{imgDir}
	workDir := imgDir
	if o.WorkDir != "" && o.WorkDir != o.ImagesDir {
		workDir, err = os.Open(o.WorkDir)
		if err != nil {
			imgDir.Close()
			return nil, nil, fmt.Errorf("open work dir: %w", err)
		}
		files = append(files, workDir)
	}
	level := o.LogLevel
	if level == 0 {
		level = 4
	}
	ro := &rpc.CriuOpts{
		// CRIU opens these through /proc/<our pid>/fd/<n>.
		ImagesDirFd:    ptr(int32(imgDir.Fd())),
		WorkDirFd:      ptr(int32(workDir.Fd())),
		LogLevel:       ptr(int32(level)),
		LogFile:        ptr(o.LogFile),
		TcpEstablished: ptr(o.TCPEstablished),
		ShellJob:       ptr(o.ShellJob),
		FileLocks:      ptr(o.FileLocks),
		ExtUnixSk:      ptr(o.ExtUnixSockets),
		External:       o.External,
	}
	if o.Pid != 0 {
		ro.Pid = ptr(int32(o.Pid))
		ro.LeaveRunning = ptr(o.LeaveRunning)
		if o.LeaveStopped {
			ro.LeaveStopped = ptr(true)
		}
	}
	if o.PageServer != nil && o.PageServer.File == nil {
		ro.Ps = &rpc.CriuPageServerInfo{Address: ptr(o.PageServer.Address), Port: ptr(o.PageServer.Port)}
	}
	if o.RestoreSibling {
		ro.RstSibling = ptr(true)
	}
	if o.LazyPages {
		ro.LazyPages = ptr(true)
	}
	if o.Timeout > 0 {
		ro.Timeout = ptr(uint32(o.Timeout))
	}
	if o.FreezeCgroup != "" {
		ro.FreezeCgroup = ptr(o.FreezeCgroup)
	}
	// cryo leaves cgroups alone: a restored job joins the cgroups of the
	// cryo that restores it (today's allocation, say a requeued Slurm
	// job's), never the paths it was dumped from, which may be another
	// job's, gone, or cryo's own temporary freezer cgroups.
	ro.ManageCgroupsMode = rpc.CriuCgMode_IGNORE.Enum()
	return ro, files, nil
}

// Dump checkpoints the tree rooted at o.Pid into o.ImagesDir. On failure the
// error carries the Error lines of CRIU's log and the log's path; CRIU
// resumes the tree itself when a dump fails.
func Dump(ctx context.Context, b Binary, o Options, nfy Notify) error {
	if o.Pid <= 0 {
		return errors.New("criu dump: no pid")
	}
	if o.LogFile == "" {
		o.LogFile = "dump.log"
	}
	ro, files, err := o.rpcOpts()
	if err != nil {
		return err
	}
	defer closeAll(files)
	var extra []*os.File
	if ps := o.PageServer; ps != nil && ps.File != nil {
		// CRIU in swrk mode may use a page-server socket we hand it (fd 4):
		// no port to pick, nothing listening on the network.
		extra = append(extra, ps.File)
		ro.Ps = &rpc.CriuPageServerInfo{Fd: ptr(int32(4)), Port: ptr(int32(0))}
	}
	t := rpc.CriuReqType_DUMP
	_, err = swrk(ctx, b.Path, &rpc.CriuReq{Type: &t, Opts: ro}, extra, false, nfy)
	if err != nil {
		return o.explain(err)
	}
	return nil
}

// Restore brings back the tree imaged in o.ImagesDir and returns the PID of
// its root. With RestoreSibling the root is a child of the calling process.
func Restore(ctx context.Context, b Binary, o Options, nfy Notify) (int, error) {
	if o.LogFile == "" {
		o.LogFile = "restore.log"
	}
	ro, files, err := o.rpcOpts()
	if err != nil {
		return 0, err
	}
	defer closeAll(files)
	var extra []*os.File
	for key, f := range o.InheritFds {
		// fd 3 is the RPC socket; extras start at 4.
		ro.InheritFd = append(ro.InheritFd, &rpc.InheritFd{Key: proto.String(key), Fd: ptr(int32(4 + len(extra)))})
		extra = append(extra, f)
	}
	// CRIU opens our images dir through /proc/<pid>/fd of the RPC peer, so
	// the fds above stay valid; inherited fds must be CRIU's own.
	var pid int32
	wrapped := func(script string, p int32) error {
		if script == "post-restore" {
			pid = p
		}
		if nfy != nil {
			return nfy(script, p)
		}
		return nil
	}
	ro.NotifyScripts = ptr(true)
	t := rpc.CriuReqType_RESTORE
	resp, err := swrk(ctx, b.Path, &rpc.CriuReq{Type: &t, Opts: ro}, extra, o.RestoreDetached, wrapped)
	if err != nil {
		return 0, o.explain(err)
	}
	if pid == 0 {
		pid = resp.GetRestore().GetPid()
	}
	return int(pid), nil
}

func (o Options) explain(err error) error {
	dir := o.WorkDir
	if dir == "" {
		dir = o.ImagesDir
	}
	return &Error{Err: err, Log: filepath.Join(dir, o.LogFile)}
}

func closeAll(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}
