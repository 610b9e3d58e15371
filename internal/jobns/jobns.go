// Package jobns gives a job namespaces of its own: PID, IPC and mount
// namespaces, and for a user who is not root a user namespace that owns
// them and maps only the user's own uid and gid. job-init is their PID 1.
//
// Inside, the job has a private /proc, a private /dev/shm and a private
// temporary directory (tmpfs), so that one CRIU dump of job-init captures
// its SysV IPC, POSIX shared memory and temporary files with it (CRIU dumps
// the contents of the tmpfs mounts of a mount namespace it dumps), and a
// restore creates fresh namespaces in which the job's PIDs cannot collide
// with anything on the node. Everything else is the node's own tree, seen
// as it is (home, parallel file systems, /usr).
//
// It owns: the clone attributes job-init is started with (Attr), the
// set-up job-init does in them before the job's first process (Setup),
// and the probe that says whether this node allows it (Probe). It must not
// start, signal or supervise processes: the monitor does.
package jobns

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrUnavailable means this node does not let cryo give jobs namespaces of
// their own (for a user: user namespaces are off); the error says why and
// what an admin changes.
var ErrUnavailable = errors.New("job namespaces are not available here")

// Attr returns the attributes to start job-init with: new PID, IPC and
// mount namespaces, owned by a new user namespace that maps the caller's
// uid and gid to themselves when user is set (a caller who is not root);
// base's other fields are kept. job-init gets CAP_SYS_ADMIN in that user
// namespace (only there) to mount its /proc, /dev/shm and temporary
// directory; Setup drops it before the job runs.
func Attr(base syscall.SysProcAttr, user bool) *syscall.SysProcAttr {
	a := base
	a.Cloneflags |= syscall.CLONE_NEWPID | syscall.CLONE_NEWNS | syscall.CLONE_NEWIPC
	if user {
		a.Cloneflags |= syscall.CLONE_NEWUSER
		uid, gid := os.Getuid(), os.Getgid()
		a.UidMappings = []syscall.SysProcIDMap{{ContainerID: uid, HostID: uid, Size: 1}}
		a.GidMappings = []syscall.SysProcIDMap{{ContainerID: gid, HostID: gid, Size: 1}}
		a.GidMappingsEnableSetgroups = false
		a.AmbientCaps = []uintptr{unix.CAP_SYS_ADMIN}
	}
	return &a
}

// Setup is job-init's first act as PID 1 of the job's namespaces, before
// it starts any of the job's processes: it keeps the job's mounts to
// itself, mounts a /proc of the job's PID namespace, an empty tmpfs on
// /dev/shm and on tmpDir (a directory that exists; "" for none), and, in a
// user namespace, drops every capability so the job runs with none. A
// job-init that is not PID 1 of new namespaces does nothing (cryo run
// without namespaces).
func Setup(tmpDir string) error {
	if os.Getpid() != 1 {
		return nil
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("job namespace: make / private: %w", err)
	}
	mounts := []struct{ fstype, src, dir, data string }{
		{"proc", "proc", "/proc", ""},
		{"tmpfs", "cryo-shm", "/dev/shm", "mode=1777"},
	}
	if tmpDir != "" {
		mounts = append(mounts, struct{ fstype, src, dir, data string }{"tmpfs", "cryo-tmp", tmpDir, "mode=0700"})
	}
	for _, m := range mounts {
		flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV)
		if m.fstype == "proc" {
			flags |= unix.MS_NOEXEC
		}
		if err := unix.Mount(m.src, m.dir, m.fstype, flags, m.data); err != nil {
			return fmt.Errorf("job namespace: mount %s on %s: %w", m.fstype, m.dir, err)
		}
	}
	if inUserNamespace() {
		return dropCapabilities()
	}
	return nil
}

// inUserNamespace tells whether we are in a user namespace other than the
// node's (whose uid_map maps all of 0..2^32-2).
func inUserNamespace() bool {
	b, err := os.ReadFile("/proc/self/uid_map")
	if err != nil {
		return false
	}
	f := strings.Fields(string(b))
	return !(len(f) == 3 && f[0] == "0" && f[1] == "0" && f[2] == "4294967295")
}

// dropCapabilities leaves job-init, and so every process it starts, with no
// capability at all, not even in its own user namespace.
func dropCapabilities() error {
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return fmt.Errorf("job namespace: clear ambient capabilities: %w", err)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var none [2]unix.CapUserData
	if err := unix.Capset(&hdr, &none[0]); err != nil {
		return fmt.Errorf("job namespace: drop capabilities: %w", err)
	}
	return nil
}

// Probe says whether jobs may have namespaces of their own here, for this
// caller (user: not root): it starts a process in them, as Attr would,
// that exits at once. The error says why not and what an admin changes.
func Probe(user bool) error {
	cmd := exec.Command("/bin/true")
	cmd.SysProcAttr = Attr(syscall.SysProcAttr{}, user)
	err := cmd.Run()
	if err == nil {
		return nil
	}
	why := err.Error()
	if user {
		if b, rerr := os.ReadFile("/proc/sys/user/max_user_namespaces"); rerr == nil && strings.TrimSpace(string(b)) == "0" {
			why = "user namespaces are off (user.max_user_namespaces = 0); an admin runs: sysctl -w user.max_user_namespaces=15000"
		} else if b, rerr := os.ReadFile("/proc/sys/kernel/unprivileged_userns_clone"); rerr == nil && strings.TrimSpace(string(b)) == "0" {
			why = "users may not create user namespaces (kernel.unprivileged_userns_clone = 0); an admin runs: sysctl -w kernel.unprivileged_userns_clone=1"
		} else if b, rerr := os.ReadFile("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"); rerr == nil && strings.TrimSpace(string(b)) == "1" {
			why = "AppArmor keeps users from creating user namespaces; an admin allows it for cryo in an AppArmor profile, or runs: sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"
		}
	}
	return fmt.Errorf("%w: %s", ErrUnavailable, why)
}
