package monitor

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// sockInfo is what the channel watcher knows of one socket.
type sockInfo struct {
	ino      uint64
	kind     string // "unix" or "tcp"
	state    int    // TCP state (1 established, 8 close-wait, ...) for tcp; 1/7/10 for unix
	peer     uint64 // unix: inode of the peer socket
	shutdown int    // unix: RCV_SHUTDOWN|SEND_SHUTDOWN bits
	local    string // tcp: local addr:port (hex as in /proc/net/tcp)
	remote   string // tcp: remote addr:port
}

// socketInodes returns the socket inodes each pid holds open.
func socketInodes(pids []int) map[uint64]int {
	out := map[uint64]int{}
	for _, pid := range pids {
		dir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range ents {
			link, err := os.Readlink(filepath.Join(dir, e.Name()))
			if err != nil || !strings.HasPrefix(link, "socket:[") {
				continue
			}
			ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]"), 10, 64)
			if err == nil {
				out[ino] = pid
			}
		}
	}
	return out
}

// tcpSockets reads /proc/net/tcp and tcp6 for the given inodes.
func tcpSockets(want map[uint64]int) map[uint64]sockInfo {
	out := map[uint64]sockInfo{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		fh, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		sc.Scan() // header
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) < 10 {
				continue
			}
			ino, _ := strconv.ParseUint(fs[9], 10, 64)
			if _, ok := want[ino]; !ok || ino == 0 {
				continue
			}
			st, _ := strconv.ParseInt(fs[3], 16, 32)
			out[ino] = sockInfo{ino: ino, kind: "tcp", state: int(st), local: fs[1], remote: fs[2]}
		}
		fh.Close()
	}
	return out
}

// Constants of the unix sock_diag interface (linux/unix_diag.h).
const (
	sockDiagByFamily = 20
	udiagShowPeer    = 0x4
	unixDiagPeer     = 2
	unixDiagShutdown = 6
)

// unixSockets asks the kernel (sock_diag) for the state, peer and
// shutdown bits of every unix socket, keeping the given inodes.
func unixSockets(want map[uint64]int) (map[uint64]sockInfo, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sock_diag: %w", err)
	}
	defer unix.Close(fd)
	// nlmsghdr (16) + unix_diag_req (24)
	req := make([]byte, 16+24)
	binary.LittleEndian.PutUint32(req[0:], uint32(len(req)))
	binary.LittleEndian.PutUint16(req[4:], sockDiagByFamily)
	binary.LittleEndian.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	binary.LittleEndian.PutUint32(req[8:], 1)
	req[16] = unix.AF_UNIX
	binary.LittleEndian.PutUint32(req[20:], 0xffffffff) // all states
	binary.LittleEndian.PutUint32(req[28:], udiagShowPeer)
	binary.LittleEndian.PutUint32(req[32:], 0xffffffff) // no cookie
	binary.LittleEndian.PutUint32(req[36:], 0xffffffff)
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("sock_diag: %w", err)
	}
	out := map[uint64]sockInfo{}
	buf := make([]byte, 64<<10)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return nil, fmt.Errorf("sock_diag: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, fmt.Errorf("sock_diag: %w", err)
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				return nil, fmt.Errorf("sock_diag: kernel error")
			}
			d := m.Data
			if len(d) < 16 {
				continue
			}
			ino := uint64(binary.LittleEndian.Uint32(d[4:]))
			if _, ok := want[ino]; !ok {
				continue
			}
			si := sockInfo{ino: ino, kind: "unix", state: int(d[2])}
			if d[1] != unix.SOCK_STREAM && d[1] != unix.SOCK_SEQPACKET {
				continue
			}
			for a := d[16:]; len(a) >= 4; {
				l := int(binary.LittleEndian.Uint16(a[0:]))
				typ := binary.LittleEndian.Uint16(a[2:])
				if l < 4 || l > len(a) {
					break
				}
				v := a[4:l]
				switch {
				case typ == unixDiagPeer && len(v) >= 4:
					si.peer = uint64(binary.LittleEndian.Uint32(v))
				case typ == unixDiagShutdown && len(v) >= 1:
					si.shutdown = int(v[0])
				}
				l = (l + 3) &^ 3
				if l > len(a) {
					break
				}
				a = a[l:]
			}
			out[ino] = si
		}
	}
}

// tcpEstablished is TCP_ESTABLISHED in /proc/net/tcp.
const tcpEstablished = 1

var tcpStates = map[int]string{1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
	6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
