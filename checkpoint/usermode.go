package checkpoint

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cryo-hpc/cryo/internal/proc"
)

// ErrUnprivileged means the job holds something that CRIU run as its user
// (cryo's user mode) cannot checkpoint; the error names the process, the
// resource and what to do, and nothing was dumped.
var ErrUnprivileged = errors.New("cannot be checkpointed by its user")

// userModePreflight finds, before any dump, what an unprivileged CRIU
// would fail on half-way, so that a user's checkpoint either works or says
// in one line why not: a process of the tree that runs with other
// credentials, and a TCP connection that is not listening (its state can
// only be read and restored in TCP repair mode, which needs CAP_NET_ADMIN
// in its network namespace).
//
// Credentials are the real, effective, saved and file-system uids and
// gids: the kernel lets the user's CRIU seize (ptrace) only a process
// whose uids and gids are all the user's, and a restore as the user can
// give a process no other ids (setresgid without CAP_SETGID), so a setuid
// or setgid program, or one started with another group, could be neither
// dumped nor restored faithfully.
func userModePreflight(roots []int) error {
	uid, gid := os.Getuid(), os.Getgid()
	for _, root := range roots {
		pids, err := proc.Tree(root)
		if err != nil {
			return err
		}
		for _, pid := range pids {
			if err := userModeProcess(pid, uid, gid); err != nil {
				return err
			}
		}
	}
	return nil
}

func userModeProcess(pid, uid, gid int) error {
	comm := commOf(pid)
	uids, gids, err := statusIDs(pid)
	if errors.Is(err, proc.ErrNoProcess) {
		return nil // gone meanwhile: CRIU will not see it either
	}
	if err != nil {
		return fmt.Errorf("pid %d (%s): %w", pid, comm, err)
	}
	for _, id := range uids {
		if id != uid {
			return fmt.Errorf("pid %d (%s) runs as uid %d, not as you (uid %d): CRIU run as a user can checkpoint only the user's own processes; let its owner checkpoint it, or an admin as root: %w",
				pid, comm, id, uid, ErrUnprivileged)
		}
	}
	for _, id := range gids {
		if id != gid {
			return fmt.Errorf("pid %d (%s) runs with gid %d, not your gid %d (a setgid program, or started with another group): CRIU run as a user can neither seize it nor give it that group back; run the job with your own group, or have an admin checkpoint it as root: %w",
				pid, comm, id, gid, ErrUnprivileged)
		}
	}
	conns, err := tcpConnections(pid)
	if err != nil {
		return fmt.Errorf("pid %d (%s): %w", pid, comm, err)
	}
	if len(conns) > 0 {
		return fmt.Errorf("pid %d (%s) has a TCP connection (%s): checkpointing one needs TCP repair, which a user may not use (CAP_NET_ADMIN); connect the job's trees over a unix socket instead, or have an admin checkpoint it as root: %w",
			pid, comm, conns[0], ErrUnprivileged)
	}
	return nil
}

func commOf(pid int) string {
	b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "comm"))
	return strings.TrimSpace(string(b))
}

// statusIDs are the real, effective, saved and file-system uids and gids
// of pid.
func statusIDs(pid int) (uids, gids []int, err error) {
	if uids, err = proc.StatusInts(pid, "Uid"); err == nil && len(uids) == 0 {
		err = fmt.Errorf("status has no Uid line")
	}
	if err != nil {
		return nil, nil, err
	}
	if gids, err = proc.StatusInts(pid, "Gid"); err == nil && len(gids) == 0 {
		err = fmt.Errorf("status has no Gid line")
	}
	return uids, gids, err
}

// tcpListen is the state of a listening socket in /proc/net/tcp: the only
// one CRIU restores without TCP repair (by binding and listening again).
const tcpListen = "0A"

// tcpConnections describes the TCP sockets pid holds open that are not
// listening ("127.0.0.1:7000 -> 127.0.0.1:41234"), read from its own
// network namespace's tables.
func tcpConnections(pid int) ([]string, error) {
	dir := filepath.Join("/proc", strconv.Itoa(pid))
	ents, err := os.ReadDir(filepath.Join(dir, "fd"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	inodes := map[string]bool{}
	for _, e := range ents {
		l, err := os.Readlink(filepath.Join(dir, "fd", e.Name()))
		if err != nil {
			continue
		}
		if ino, ok := strings.CutPrefix(l, "socket:["); ok {
			inodes[strings.TrimSuffix(ino, "]")] = true
		}
	}
	if len(inodes) == 0 {
		return nil, nil
	}
	var out []string
	for _, table := range []string{"tcp", "tcp6"} {
		f, err := os.Open(filepath.Join(dir, "net", table))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		sc := bufio.NewScanner(f)
		sc.Scan() // the header
		for sc.Scan() {
			// sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
			fs := strings.Fields(sc.Text())
			if len(fs) < 10 || !inodes[fs[9]] || fs[3] == tcpListen {
				continue
			}
			out = append(out, hexAddr(fs[1])+" -> "+hexAddr(fs[2]))
		}
		f.Close()
	}
	return out, nil
}

// hexAddr renders /proc/net/tcp's "0100007F:1B58" as "127.0.0.1:7000"
// (IPv4; IPv6 addresses stay in hex, which is enough to name them).
func hexAddr(s string) string {
	host, port, ok := strings.Cut(s, ":")
	p, err := strconv.ParseUint(port, 16, 16)
	if !ok || err != nil {
		return s
	}
	if len(host) == 8 {
		if v, err := strconv.ParseUint(host, 16, 32); err == nil {
			return fmt.Sprintf("%d.%d.%d.%d:%d", v&0xff, v>>8&0xff, v>>16&0xff, v>>24, p)
		}
	}
	return fmt.Sprintf("[%s]:%d", host, p)
}
