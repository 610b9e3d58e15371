package inspect

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"github.com/cryo-hpc/cryo/internal/pageserver"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"

	"github.com/checkpoint-restore/go-criu/v7/crit"
	criucore "github.com/checkpoint-restore/go-criu/v7/crit/images/criu-core"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/fdinfo"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/fs"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/mm"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/pagemap"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/pstree"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/vma"
	"github.com/cryo-hpc/cryo/internal/store"
	"google.golang.org/protobuf/proto"
)

// VMA status bits of CRIU's images (criu/include/image.h).
const (
	vmaFilePrivate = 1 << 6
	vmaFileShared  = 1 << 7
	vmaAnonShared  = 1 << 8
	vmaAnonPrivate = 1 << 9
)

// Pagemap entry flags (criu/include/pagemap.h).
const pePresent = 1 << 2

// maxArgv bounds the command line read from the pages.
const maxArgv = 64 << 10

var pageSize = int64(os.Getpagesize())

// decode reads every entry of one CRIU image. It decodes a single file
// with crit.New(...).Decode and none of crit's Explore functions, which
// keep package-level caches.
func decode(path string, msg proto.Message) ([]proto.Message, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	img, err := crit.New(f, nil, "", false, false).Decode(msg)
	if err != nil {
		return nil, fmt.Errorf("decode %s: %w", filepath.Base(path), err)
	}
	out := make([]proto.Message, 0, len(img.Entries))
	for _, e := range img.Entries {
		out = append(out, e.Message)
	}
	return out, nil
}

// run is a run of dumped pages at a virtual address, at an offset of the
// pages image.
type run struct {
	vaddr uint64
	off   int64
	pages int64
}

// readTree decodes the processes of the tree whose images are in
// dir/tree. What cannot be decoded becomes a warning, not a failure.
func readTree(st *store.Store, m *store.Manifest, dir, tree string) ([]Process, []string) {
	var warns []string
	warn := func(format string, a ...any) { warns = append(warns, fmt.Sprintf(format, a...)) }
	base := filepath.Join(dir, tree)
	ents, err := decode(filepath.Join(base, "pstree.img"), &pstree.PstreeEntry{})
	if err != nil {
		warn("process tree: %v", err)
		return nil, warns
	}
	files, err := readFiles(base)
	if err != nil {
		warn("open files: %v", err)
	}
	var procs []Process
	for _, e := range ents {
		pe := e.(*pstree.PstreeEntry)
		p := Process{PID: int(pe.GetPid()), PPID: int(pe.GetPpid()), PGID: int(pe.GetPgid()), SID: int(pe.GetSid()), Threads: len(pe.GetThreads())}
		var filesID uint32
		if core, err := decode(filepath.Join(base, fmt.Sprintf("core-%d.img", p.PID)), &criucore.CoreEntry{}); err == nil && len(core) > 0 {
			c := core[0].(*criucore.CoreEntry)
			p.Comm = c.GetTc().GetComm()
			filesID = c.GetIds().GetFilesId()
		} else {
			warn("pid %d: core: %v", p.PID, err)
		}
		if filesID == 0 {
			if ids, err := decode(filepath.Join(base, fmt.Sprintf("ids-%d.img", p.PID)), &criucore.TaskKobjIdsEntry{}); err == nil && len(ids) > 0 {
				filesID = ids[0].(*criucore.TaskKobjIdsEntry).GetFilesId()
			}
		}
		if err := p.readMemory(st, m, base, tree); err != nil {
			warn("pid %d: memory: %v", p.PID, err)
		}
		if files != nil {
			p.FDs = readFDs(base, p.PID, filesID, files, warn)
		}
		procs = append(procs, p)
	}
	return procs, warns
}

// readMemory fills in p.Memory and p.Cmdline from the mm and pagemap
// images, reading only the pages that hold argv.
func (p *Process) readMemory(st *store.Store, m *store.Manifest, base, tree string) error {
	mms, err := decode(filepath.Join(base, fmt.Sprintf("mm-%d.img", p.PID)), &mm.MmEntry{})
	if err != nil {
		return err
	}
	if len(mms) == 0 {
		return fmt.Errorf("mm-%d.img is empty", p.PID)
	}
	me := mms[0].(*mm.MmEntry)
	vmas := me.GetVmas()
	sort.Slice(vmas, func(i, j int) bool { return vmas[i].GetStart() < vmas[j].GetStart() })
	p.Memory.VMAs = len(vmas)
	for _, v := range vmas {
		p.Memory.MappedBytes += int64(v.GetEnd() - v.GetStart())
	}
	pms, err := decode(filepath.Join(base, fmt.Sprintf("pagemap-%d.img", p.PID)), &pagemap.PagemapEntry{})
	if err != nil {
		return err
	}
	if len(pms) == 0 {
		return fmt.Errorf("pagemap-%d.img is empty", p.PID)
	}
	head, ok := pms[0].(*pagemap.PagemapHead)
	if !ok {
		return fmt.Errorf("pagemap-%d.img has no head", p.PID)
	}
	pagesName := join(tree, "pages-"+strconv.Itoa(int(head.GetPagesId()))+".img")
	var runs []run
	var off int64
	for _, x := range pms[1:] {
		pe := x.(*pagemap.PagemapEntry)
		present := !pe.GetInParent()
		if pe.Flags != nil {
			present = pe.GetFlags()&pePresent != 0
		}
		if !present {
			continue
		}
		r := run{vaddr: pe.GetVaddr(), off: off, pages: int64(pageserver.EntryPages(pe))}
		off += r.pages * pageSize
		runs = append(runs, r)
		p.Memory.Pages += r.pages
		classify(&p.Memory, vmas, r)
	}
	p.Memory.DumpedBytes = p.Memory.Pages * pageSize
	for _, f := range m.Files {
		if f.Name != pagesName {
			continue
		}
		for _, c := range f.Chunks {
			if c.Zero {
				p.Memory.ZeroPages += c.Len / pageSize
			}
		}
	}
	if a, b := me.GetMmArgStart(), me.GetMmArgEnd(); b > a {
		argv, err := readArgv(st, m, pagesName, runs, a, min(b, a+maxArgv))
		if err != nil {
			return fmt.Errorf("command line: %w", err)
		}
		p.Cmdline = argv
	}
	return nil
}

// classify counts a run's pages by the kind of mapping that holds them.
func classify(mem *Memory, vmas []*vma.VmaEntry, r run) {
	start := r.vaddr
	end := r.vaddr + uint64(r.pages*pageSize)
	i := sort.Search(len(vmas), func(i int) bool { return vmas[i].GetEnd() > start })
	counted := int64(0)
	for ; i < len(vmas) && vmas[i].GetStart() < end; i++ {
		lo, hi := max(start, vmas[i].GetStart()), min(end, vmas[i].GetEnd())
		n := int64(hi-lo) / pageSize
		counted += n
		switch s := vmas[i].GetStatus(); {
		case s&vmaAnonShared != 0:
			mem.AnonSharedPages += n
		case s&vmaFileShared != 0:
			mem.FileSharedPages += n
		case s&vmaFilePrivate != 0:
			mem.FilePrivatePages += n
		case s&vmaAnonPrivate != 0:
			mem.AnonPrivatePages += n
		default:
			mem.OtherPages += n
		}
	}
	mem.OtherPages += r.pages - counted // pages outside any mapping (should not happen)
}

// readArgv reads the bytes [a, b) of a process's memory from its pages and
// splits them into arguments.
func readArgv(st *store.Store, m *store.Manifest, pagesName string, runs []run, a, b uint64) ([]string, error) {
	var buf []byte
	for addr := a; addr < b; {
		i := sort.Search(len(runs), func(i int) bool {
			return runs[i].vaddr+uint64(runs[i].pages*pageSize) > addr
		})
		if i == len(runs) || runs[i].vaddr > addr {
			return nil, fmt.Errorf("the page at %#x holding it was not dumped", addr)
		}
		r := runs[i]
		runEnd := r.vaddr + uint64(r.pages*pageSize)
		n := min(b, runEnd) - addr
		data, err := st.ReadAt(m, pagesName, r.off+int64(addr-r.vaddr), int64(n))
		if err != nil {
			return nil, err
		}
		buf = append(buf, data...)
		addr += n
	}
	buf = bytes.TrimRight(buf, "\x00")
	var argv []string
	for _, s := range bytes.Split(buf, []byte{0}) {
		argv = append(argv, string(s))
	}
	return argv, nil
}

// readFiles indexes files.img by file id.
func readFiles(base string) (map[uint32]*fdinfo.FileEntry, error) {
	ents, err := decode(filepath.Join(base, "files.img"), &fdinfo.FileEntry{})
	if err != nil {
		return nil, err
	}
	out := map[uint32]*fdinfo.FileEntry{}
	for _, e := range ents {
		f := e.(*fdinfo.FileEntry)
		out[f.GetId()] = f
	}
	return out, nil
}

// readFDs lists a process's file descriptors and working directory.
func readFDs(base string, pid int, filesID uint32, files map[uint32]*fdinfo.FileEntry, warn func(string, ...any)) []FD {
	var fds []FD
	if fss, err := decode(filepath.Join(base, fmt.Sprintf("fs-%d.img", pid)), &fs.FsEntry{}); err == nil && len(fss) > 0 {
		if f := files[fss[0].(*fs.FsEntry).GetCwdId()]; f != nil {
			fds = append(fds, FD{FD: "cwd", Type: f.GetType().String(), Desc: describe(f)})
		}
	}
	ents, err := decode(filepath.Join(base, fmt.Sprintf("fdinfo-%d.img", filesID)), &fdinfo.FdinfoEntry{})
	if err != nil {
		warn("pid %d: file descriptors: %v", pid, err)
		return fds
	}
	for _, e := range ents {
		fi := e.(*fdinfo.FdinfoEntry)
		fd := FD{FD: strconv.Itoa(int(fi.GetFd())), Type: fi.GetType().String()}
		if f := files[fi.GetId()]; f != nil {
			fd.Desc = describe(f)
		}
		fds = append(fds, fd)
	}
	return fds
}

// describe says what an open file is: a path, or what a pipe or socket
// joins.
func describe(f *fdinfo.FileEntry) string {
	switch f.GetType() {
	case fdinfo.FdTypes_REG:
		return f.GetReg().GetName()
	case fdinfo.FdTypes_PIPE:
		return fmt.Sprintf("pipe:[%d]", f.GetPipe().GetPipeId())
	case fdinfo.FdTypes_FIFO:
		return fmt.Sprintf("fifo:[%d]", f.GetFifo().GetPipeId())
	case fdinfo.FdTypes_UNIXSK:
		u := f.GetUsk()
		s := "unix " + sockType(u.GetType())
		if name := u.GetName(); len(name) > 0 {
			if name[0] == 0 {
				name = append([]byte{'@'}, name[1:]...)
			}
			s += " " + string(bytes.TrimRight(name, "\x00"))
		}
		s += fmt.Sprintf(" ino %d", u.GetIno())
		if u.GetPeer() != 0 {
			s += fmt.Sprintf(" peer %d", u.GetPeer())
		}
		return s
	case fdinfo.FdTypes_INETSK:
		k := f.GetIsk()
		proto := map[uint32]string{6: "tcp", 17: "udp", 132: "sctp"}[k.GetProto()]
		if proto == "" {
			proto = "proto " + strconv.Itoa(int(k.GetProto()))
		}
		if k.GetFamily() == 10 {
			proto += "6"
		}
		s := proto + " " + addrPort(k.GetSrcAddr(), k.GetSrcPort())
		if k.GetDstPort() != 0 {
			s += " -> " + addrPort(k.GetDstAddr(), k.GetDstPort())
		}
		if st := tcpState(k.GetState()); st != "" && k.GetProto() == 6 {
			s += " " + st
		}
		return s
	case fdinfo.FdTypes_TTY:
		return fmt.Sprintf("tty:[%d]", f.GetTty().GetTtyInfoId())
	}
	return ""
}

func sockType(t uint32) string {
	switch t {
	case 1:
		return "stream"
	case 2:
		return "dgram"
	case 5:
		return "seqpacket"
	}
	return "type " + strconv.Itoa(int(t))
}

// addrPort renders an address as CRIU stores it: 32-bit words in network
// byte order, one for IPv4, four for IPv6.
func addrPort(words []uint32, port uint32) string {
	b := make([]byte, 4*len(words))
	for i, w := range words {
		binary.LittleEndian.PutUint32(b[4*i:], w)
	}
	var a netip.Addr
	switch len(b) {
	case 4:
		a = netip.AddrFrom4([4]byte(b))
	case 16:
		a = netip.AddrFrom16([16]byte(b)).Unmap()
	default:
		return "?:" + strconv.Itoa(int(port))
	}
	return netip.AddrPortFrom(a, uint16(port)).String()
}

func tcpState(s uint32) string {
	states := []string{"", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
		"CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING"}
	if int(s) < len(states) {
		return states[s]
	}
	return ""
}
