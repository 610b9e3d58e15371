package criu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// capCheckpointRestore is CAP_CHECKPOINT_RESTORE (Linux 5.9).
const capCheckpointRestore = 40

// AdminFix is the command an admin runs so that users may use the CRIU at
// path: the capability on the file, which only root can grant.
func AdminFix(path string) string {
	return "setcap cap_checkpoint_restore+eip " + path
}

// capable says why the file at path would not give a user
// CAP_CHECKPOINT_RESTORE when run, or nil if it does: the kernel must know
// the capability, and the file must carry it permitted and effective in
// its security.capability attribute (VFS_CAP_REVISION_2 or _3).
func capable(path string) error {
	if last, err := os.ReadFile("/proc/sys/kernel/cap_last_cap"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(last))); err == nil && n < capCheckpointRestore {
			return errors.New("this kernel has no CAP_CHECKPOINT_RESTORE (Linux >= 5.9 has it): users cannot checkpoint their own jobs here")
		}
	}
	fix := fmt.Sprintf("an admin runs: %s (scripts/install-criu.sh does)", AdminFix(path))
	buf := make([]byte, 64)
	n, err := unix.Getxattr(path, "security.capability", buf)
	if errors.Is(err, unix.ENODATA) {
		return fmt.Errorf("it has no file capabilities, so as a user it cannot checkpoint or restore even your own processes; %s", fix)
	}
	if err != nil {
		return fmt.Errorf("read its file capabilities: %w; %s", err, fix)
	}
	ok, err := hasCap(buf[:n], capCheckpointRestore)
	if err != nil {
		return fmt.Errorf("%w; %s", err, fix)
	}
	if !ok {
		return fmt.Errorf("its file capabilities do not include cap_checkpoint_restore as permitted and effective; %s", fix)
	}
	return nil
}

// hasCap reads a security.capability value: magic_etc (revision in the
// top byte, VFS_CAP_FLAGS_EFFECTIVE in bit 0), then permitted and
// inheritable words, low 32 capabilities first (revision 1 has only
// those; revision 3 adds a root uid, which does not matter here).
func hasCap(b []byte, c int) (bool, error) {
	if len(b) < 4 {
		return false, errors.New("its security.capability attribute is too short")
	}
	magic := binary.LittleEndian.Uint32(b)
	words := map[uint32]int{0x01000000: 1, 0x02000000: 2, 0x03000000: 2}[magic&0xff000000]
	if words == 0 || len(b) < 4+8*words {
		return false, fmt.Errorf("its security.capability attribute has an unknown layout (%#x)", magic)
	}
	if magic&1 == 0 {
		return false, nil // permitted, but not raised when run
	}
	w := c / 32
	if w >= words {
		return false, nil
	}
	return binary.LittleEndian.Uint32(b[4+8*w:])&(1<<(c%32)) != 0, nil
}
