package memread

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"

	"golang.org/x/sys/unix"
)

// Region is a range of a process's address space whose contents CRIU dumps
// as private memory: a private anonymous mapping, [heap], [stack],
// [stack:N] and named anonymous mappings ([anon:NAME]) included; [vdso],
// [vvar], [vsyscall], [uprobes] and other special mappings, shared
// mappings and file-backed mappings excluded. Start and End are
// page-aligned, End exclusive. Readable is the mapping's r permission: a
// region without it ("---p" guards, PROT_NONE reservations) is listed but
// not read.
type Region struct {
	Start, End uint64
	Readable   bool
}

// mapsBuffer is the read buffer for /proc/PID/maps, and so the longest line
// parsed whole. A line is at most ~100 bytes of fields and a path of up to
// PATH_MAX (with newlines escaped, up to four times that); of a longer one
// only the first mapsBuffer bytes are parsed, which is where the fields
// are, and the rest is skipped.
const mapsBuffer = 64 << 10

// Regions lists the regions of process pid, in address order, from
// /proc/PID/maps, read line by line with lines bounded. A process that
// does not exist, or has no address space any more (a zombie), gives an
// error wrapping ErrGone.
func Regions(pid int) ([]Region, error) {
	var r fdReader
	return readRegions(pid, bufio.NewReaderSize(&r, mapsBuffer), &r, nil)
}

// readRegions is Regions reading through rd, whose source it resets to fr
// (so that a Tracker reuses both), appending to out[:0].
func readRegions(pid int, rd *bufio.Reader, fr *fdReader, out []Region) ([]Region, error) {
	path := "/proc/" + strconv.Itoa(pid) + "/maps"
	fd, err := openProc(path)
	if err != nil {
		return out[:0], procErr(pid, path, err)
	}
	defer unix.Close(fd)
	fr.fd = fd
	rd.Reset(fr)
	out, lines, err := parseMaps(rd, out[:0])
	if err != nil {
		return out, procErr(pid, path, err)
	}
	if lines == 0 {
		return out, fmt.Errorf("pid %d: %s is empty, no address space (exited, a zombie): %w", pid, path, ErrGone)
	}
	return out, nil
}

// parseMaps appends to out the regions of the maps lines rd reads, and
// returns how many lines there were. Of a line longer than rd's buffer
// only the head is parsed. A region is cut to begin where the one before
// it ends: maps is read in several read(2)s, and a mapping that grew down
// meanwhile (a stack) can overlap what an earlier one printed.
func parseMaps(rd *bufio.Reader, out []Region) ([]Region, int, error) {
	lines := 0
	base := len(out)
	for {
		line, err := rd.ReadSlice('\n')
		if len(line) > 0 {
			lines++
			r, keep, perr := parseMapsLine(line)
			if perr != nil {
				return out, lines, fmt.Errorf("line %d: %w", lines, perr)
			}
			if keep && len(out) > base {
				r.Start = max(r.Start, out[len(out)-1].End)
				keep = r.Start < r.End
			}
			if keep {
				out = append(out, r)
			}
		}
		for errors.Is(err, bufio.ErrBufferFull) {
			_, err = rd.ReadSlice('\n') // the rest of a long line
		}
		if err == io.EOF {
			return out, lines, nil
		}
		if err != nil {
			return out, lines, err
		}
	}
}

// parseMapsLine parses one line of /proc/PID/maps,
//
//	7f2c4a000000-7f2c4a021000 rw-p 00000000 00:00 0                  [heap]
//
// and reports whether it is a Region. A line may be cut short after its
// inode field (a long path is then a truncated path, which is still a
// file).
func parseMapsLine(line []byte) (Region, bool, error) {
	line = bytes.TrimSuffix(line, []byte{'\n'})
	rng, rest := field(line)
	perms, rest := field(rest)
	_, rest = field(rest) // offset
	_, rest = field(rest) // device
	inode, rest := field(rest)
	path := bytes.TrimLeft(rest, " ")

	lo, hi, ok := bytes.Cut(rng, []byte{'-'})
	start, ok1 := parseHex(lo)
	end, ok2 := parseHex(hi)
	if !ok || !ok1 || !ok2 || start >= end || len(perms) != 4 || len(inode) == 0 {
		return Region{}, false, fmt.Errorf("malformed %q", clip(line))
	}
	if perms[3] != 'p' || !anonymous(path) {
		return Region{}, false, nil
	}
	return Region{Start: start, End: end, Readable: perms[0] == 'r'}, true, nil
}

// anonymous reports whether a mapping's path names private anonymous
// memory: none, or one of the kernel's names for anonymous memory.
func anonymous(path []byte) bool {
	switch {
	case len(path) == 0:
		return true
	case string(path) == "[heap]", string(path) == "[stack]":
		return true
	case bytes.HasPrefix(path, []byte("[stack:")): // a thread's stack, kernels before 4.5
		return true
	case bytes.HasPrefix(path, []byte("[anon:")): // prctl(PR_SET_VMA_ANON_NAME)
		return true
	}
	// A file, or a special mapping: [vdso], [vvar], [vvar_vclock],
	// [vsyscall], [uprobes], [anon_shmem:NAME] (shared anyway), ...
	return false
}

// field splits s at its first space into a field and the rest after that
// space.
func field(s []byte) (f, rest []byte) {
	if i := bytes.IndexByte(s, ' '); i >= 0 {
		return s[:i], s[i+1:]
	}
	return s, nil
}

// parseHex parses an unsigned hexadecimal number of 1 to 16 digits.
func parseHex(s []byte) (uint64, bool) {
	if len(s) == 0 || len(s) > 16 {
		return 0, false
	}
	var v uint64
	for _, c := range s {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		case 'A' <= c && c <= 'F':
			c -= 'A' - 10
		default:
			return 0, false
		}
		v = v<<4 | uint64(c)
	}
	return v, true
}

// clip shortens a line quoted in an error.
func clip(s []byte) []byte {
	if len(s) > 120 {
		return s[:120]
	}
	return s
}

// fdReader reads a file descriptor, as an io.Reader that a Tracker keeps
// and reuses without an *os.File.
type fdReader struct{ fd int }

func (r *fdReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		n, err := unix.Read(r.fd, p)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return 0, err
		case n == 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

// openProc opens a file of /proc read-only.
func openProc(path string) (int, error) {
	for {
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != unix.EINTR {
			return fd, err
		}
	}
}

// procErr wraps an error about a process: with ErrGone where it says the
// process is no more (ENOENT opening its /proc files, ESRCH), with a hint
// where access was refused.
func procErr(pid int, what string, err error) error {
	switch {
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ESRCH):
		return fmt.Errorf("pid %d: %s: %w: %w", pid, what, ErrGone, err)
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return fmt.Errorf("pid %d: %s: %w (reading another user's or a non-dumpable process needs CAP_SYS_PTRACE)", pid, what, err)
	}
	return fmt.Errorf("pid %d: %s: %w", pid, what, err)
}
