package criu

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"google.golang.org/protobuf/proto"
)

// ptr returns a pointer to v, for protobuf optional fields.
func ptr[T any](v T) *T { return &v }

// Options is everything cryo asks of CRIU for one dump or restore. It is
// translated in exactly one place, the options table below, into both forms
// CRIU takes: an RPC request (criu swrk) and a command line (criu restore
// --stream, criu lazy-pages). TestOptionsBothWays checks that every field
// reaches both.
type Options struct {
	ImagesDir string // where images are written (dump) or read (restore)
	WorkDir   string // where CRIU writes its log; ImagesDir when empty
	LogFile   string // log file name inside WorkDir, e.g. "dump.log"
	LogLevel  int    // 0-4; 4 is CRIU's debug level (default)

	// Unprivileged runs CRIU as the calling user, who is not root: with the
	// binary's cap_checkpoint_restore it dumps and restores that user's own
	// processes, which come back with exactly that user's credentials.
	Unprivileged bool

	// Dump only.
	Pid          int  // root of the tree to dump
	LeaveRunning bool // resume the tree after the dump
	LeaveStopped bool // leave the tree stopped (SIGSTOP) after the dump
	// PageServer, when set, sends memory pages to a page server instead of
	// writing pages-*.img locally (a dump), or is the page server a lazy
	// restore's daemon asks for pages (criu lazy-pages).
	PageServer *PageServerAddr
	Timeout    int // seconds CRIU may spend freezing; 0 for CRIU's default
	// FreezeCgroup is a cgroup v1 freezer holding exactly the tree, which
	// CRIU freezes (or finds frozen and leaves so) instead of stopping the
	// tasks one by one.
	FreezeCgroup string

	// Restore only.
	RestoreSibling  bool // restored root becomes a child of the caller
	RestoreDetached bool // restore into a new session, away from our terminal
	// LazyPages leaves the pages marked lazy in the images to CRIU's
	// lazy-pages daemon, which must be listening in WorkDir.
	LazyPages bool
	// Root is the directory that becomes the root of a restored mount
	// namespace: "/" for a job whose mount namespace is the node's tree
	// with its own /proc, /dev/shm and temporary directory on top.
	Root string

	// Both.
	TCPEstablished bool // checkpoint/restore established TCP connections
	ShellJob       bool // allow a tree whose session leader is outside it
	FileLocks      bool
	ExtUnixSockets bool
	// AutoExtMounts takes the mounts a job's mount namespace shares with
	// the node as external: not dumped, and found again on the node at
	// restore (--ext-mount-map auto).
	AutoExtMounts bool
	// GhostLimit is the largest deleted-but-open file CRIU keeps the
	// contents of, in bytes (0: CRIU's 1 MiB).
	GhostLimit uint32
	// ConfigFile is a CRIU configuration file with options cryo does not
	// know (CRIU's own syntax: one long option per line).
	ConfigFile string
	// External resources, in CRIU's --external syntax.
	External []string
	// SkipMounts are mount points of the job's mount namespace a dump leaves
	// out (--skip-mnt): mounts of the node's that need not, or cannot, be
	// part of the job (see checkpoint's nodeMounts).
	SkipMounts []string
	// InheritFds maps a CRIU resource key (e.g. "pipe:[1234]") to a file that
	// the restored tree receives in its place.
	InheritFds map[string]*os.File
}

// PageServerAddr is where a dump sends its pages, or where a lazy-pages
// daemon asks for them: a connected stream socket handed to CRIU (File,
// dumps only), or a TCP address.
type PageServerAddr struct {
	File    *os.File
	Address string
	Port    int32
}

// option is one of CRIU's options: whether o asks for it and with which
// argument, how that reads on CRIU's command line, and how in a request.
type option struct {
	flag string                            // CRIU's long option
	arg  func(o *Options) (string, bool)   // the argument ("" for a switch), and whether it is set
	rpc  func(o *Options, r *rpc.CriuOpts) // the same choice in an RPC request
	only func(o *Options, cmd string) bool // nil: every command; else whether cmd takes it
}

func on(b bool) (string, bool) { return "", b }

// options is the one translation of Options into CRIU's terms. Options
// that are files or directories (images, work dir, page-server socket,
// inherited fds) are the builders' own: they decide fd numbers.
var options = []option{
	{flag: "--unprivileged", arg: func(o *Options) (string, bool) { return on(o.Unprivileged) },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.Unprivileged = ptr(true) }},
	{flag: "--log-file", arg: func(o *Options) (string, bool) { return o.LogFile, o.LogFile != "" },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.LogFile = ptr(o.LogFile) }},
	{flag: "-v", arg: func(o *Options) (string, bool) { return strconv.Itoa(o.level()), true },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.LogLevel = ptr(int32(o.level())) }},
	{flag: "--tree", arg: func(o *Options) (string, bool) { return strconv.Itoa(o.Pid), o.Pid != 0 },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.Pid = ptr(int32(o.Pid)) }},
	{flag: "--leave-running", arg: func(o *Options) (string, bool) { return on(o.LeaveRunning) },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.LeaveRunning = ptr(true) }},
	{flag: "--leave-stopped", arg: func(o *Options) (string, bool) { return on(o.LeaveStopped) },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.LeaveStopped = ptr(true) }},
	{flag: "--timeout", arg: func(o *Options) (string, bool) { return strconv.Itoa(o.Timeout), o.Timeout > 0 },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.Timeout = ptr(uint32(o.Timeout)) }},
	{flag: "--freeze-cgroup", arg: func(o *Options) (string, bool) { return o.FreezeCgroup, o.FreezeCgroup != "" },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.FreezeCgroup = ptr(o.FreezeCgroup) }},
	{flag: "--restore-sibling", arg: func(o *Options) (string, bool) { return on(o.RestoreSibling) },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.RstSibling = ptr(true) }},
	// A swrk restore is always detached from CRIU; on the command line the
	// tree is restored detached and CRIU returns once it runs.
	{flag: "--restore-detached", arg: func(o *Options) (string, bool) { return on(o.RestoreDetached || o.RestoreSibling) },
		rpc: func(o *Options, r *rpc.CriuOpts) {}, only: func(o *Options, cmd string) bool { return cmd == "restore" }},
	{flag: "--lazy-pages", arg: func(o *Options) (string, bool) { return on(o.LazyPages) },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.LazyPages = ptr(true) }, only: notLazyDaemon},
	{flag: "--root", arg: func(o *Options) (string, bool) { return o.Root, o.Root != "" },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.Root = ptr(o.Root) }},
	{flag: "--tcp-established", arg: func(o *Options) (string, bool) { return on(o.TCPEstablished) },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.TcpEstablished = ptr(true) }},
	{flag: "--shell-job", arg: func(o *Options) (string, bool) { return on(o.ShellJob) },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.ShellJob = ptr(true) }},
	{flag: "--file-locks", arg: func(o *Options) (string, bool) { return on(o.FileLocks) },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.FileLocks = ptr(true) }},
	{flag: "--ext-unix-sk", arg: func(o *Options) (string, bool) { return on(o.ExtUnixSockets) },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.ExtUnixSk = ptr(true) }},
	{flag: "--ext-mount-map", arg: func(o *Options) (string, bool) { return "auto", o.AutoExtMounts },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.AutoExtMnt = ptr(true) }},
	// A mount of the job's namespace that receives propagation from one of
	// the node's (a slave of a node peer group: /run/netns once `ip netns`
	// made it a shared mount, in a user's namespace where the node's mounts
	// become slaves) is dumped as such; the node's side is found again at
	// restore like any external mount.
	{flag: "--enable-external-masters", arg: func(o *Options) (string, bool) { return on(o.AutoExtMounts) },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.ExtMasters = ptr(true) }},
	{flag: "--ghost-limit", arg: func(o *Options) (string, bool) { return strconv.FormatUint(uint64(o.GhostLimit), 10), o.GhostLimit > 0 },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.GhostLimit = ptr(o.GhostLimit) }},
	{flag: "--config", arg: func(o *Options) (string, bool) { return o.ConfigFile, o.ConfigFile != "" },
		rpc: func(o *Options, r *rpc.CriuOpts) { r.ConfigFile = ptr(o.ConfigFile) }},
	// cryo leaves cgroups alone: a restored job joins the cgroups of the
	// cryo that restores it (today's allocation, say a requeued Slurm
	// job's), never the paths it was dumped from, which may be another
	// job's, gone, or cryo's own temporary freezer cgroups.
	// (An optional argument: CRIU's command line takes it only after "=".)
	{flag: "--manage-cgroups=ignore", arg: func(o *Options) (string, bool) { return on(true) },
		rpc:  func(o *Options, r *rpc.CriuOpts) { r.ManageCgroupsMode = rpc.CriuCgMode_IGNORE.Enum() },
		only: notLazyDaemon},
}

func notLazyDaemon(o *Options, cmd string) bool { return cmd != "lazy-pages" }

func (o *Options) level() int {
	if o.LogLevel == 0 {
		return 4
	}
	return o.LogLevel
}

func (o *Options) work() string {
	if o.WorkDir == "" {
		return o.ImagesDir
	}
	return o.WorkDir
}

// request renders o as a swrk RPC request's options. CRIU opens the images
// and work directories through /proc/<our pid>/fd/<n>, so they are opened
// here and must stay open for the RPC (close them after). Extra files
// appear in CRIU as fds 4, 5, ... (fd 3 is the RPC socket).
func (o Options) request() (ro *rpc.CriuOpts, open, extra []*os.File, err error) {
	imgDir, err := os.Open(o.ImagesDir)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("open images dir: %w", err)
	}
	open = []*os.File{imgDir}
	workDir := imgDir
	if o.WorkDir != "" && o.WorkDir != o.ImagesDir {
		if workDir, err = os.Open(o.WorkDir); err != nil {
			imgDir.Close()
			return nil, nil, nil, fmt.Errorf("open work dir: %w", err)
		}
		open = append(open, workDir)
	}
	ro = &rpc.CriuOpts{ImagesDirFd: ptr(int32(imgDir.Fd())), WorkDirFd: ptr(int32(workDir.Fd()))}
	for _, opt := range options {
		if _, set := opt.arg(&o); set && (opt.only == nil || opt.only(&o, "swrk")) {
			opt.rpc(&o, ro)
		}
	}
	ro.External = append(ro.External, o.External...)
	ro.SkipMnt = append(ro.SkipMnt, o.SkipMounts...)
	nextFd := func(f *os.File) int32 {
		extra = append(extra, f)
		return int32(3 + len(extra))
	}
	if ps := o.PageServer; ps != nil {
		if ps.File != nil {
			// A page-server socket we hand CRIU: no port to pick, nothing
			// listening on the network.
			ro.Ps = &rpc.CriuPageServerInfo{Fd: ptr(nextFd(ps.File)), Port: ptr(int32(0))}
		} else {
			ro.Ps = &rpc.CriuPageServerInfo{Address: ptr(ps.Address), Port: ptr(ps.Port)}
		}
	}
	for _, key := range sortedKeys(o.InheritFds) {
		ro.InheritFd = append(ro.InheritFd, &rpc.InheritFd{Key: proto.String(key), Fd: ptr(nextFd(o.InheritFds[key]))})
	}
	return ro, open, extra, nil
}

// cmdline renders o as the arguments of `criu cmd`. Extra files appear in
// CRIU as fds 3, 4, ... (exec.Cmd.ExtraFiles).
func (o Options) cmdline(cmd string) (args []string, extra []*os.File) {
	args = []string{cmd, "-D", o.ImagesDir, "-W", o.work()}
	for _, opt := range options {
		v, set := opt.arg(&o)
		if !set || (opt.only != nil && !opt.only(&o, cmd)) {
			continue
		}
		switch {
		case opt.flag == "-v":
			args = append(args, "-v"+v)
		case v == "":
			args = append(args, opt.flag)
		default:
			args = append(args, opt.flag, v)
		}
	}
	for _, e := range o.External {
		args = append(args, "--external", e)
	}
	for _, m := range o.SkipMounts {
		args = append(args, "--skip-mnt", m)
	}
	if ps := o.PageServer; ps != nil && ps.File == nil {
		args = append(args, "--page-server", "--address", ps.Address, "--port", strconv.Itoa(int(ps.Port)))
	}
	for _, key := range sortedKeys(o.InheritFds) {
		args = append(args, "--inherit-fd", fmt.Sprintf("fd[%d]:%s", 3+len(extra), key))
		extra = append(extra, o.InheritFds[key])
	}
	return args, extra
}

func sortedKeys(m map[string]*os.File) []string { return slices.Sorted(maps.Keys(m)) }

// JobOptions are the choices every dump and restore of a cryo job makes
// with CRIU b (the one set: checkpoint and restore both start from it):
// a job's tree may have its session leader outside it (shell jobs), hold
// file locks and unix sockets to outside, and live in a mount namespace of
// its own on top of the node's mounts. Established TCP connections need
// TCP repair, that is CAP_NET_ADMIN, which an unprivileged CRIU does not
// have: a user's checkpoint refuses them before the dump instead.
func JobOptions(b Binary) Options {
	return Options{TCPEstablished: !b.Unprivileged, ShellJob: true, FileLocks: true, ExtUnixSockets: true,
		AutoExtMounts: true}
}

// MountNamespaceRoot is what Options.Root must be to restore images that
// hold a mount namespace (a `cryo run` job's): the node's own tree, on top
// of which CRIU puts the job's mounts. "" for images without one.
func MountNamespaceRoot(imageNames []string) string {
	for _, n := range imageNames {
		if strings.HasPrefix(filepath.Base(n), "mountpoints-") {
			return "/"
		}
	}
	return ""
}
