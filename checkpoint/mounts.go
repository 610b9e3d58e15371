package checkpoint

import (
	"bufio"
	"os"
	"strconv"
	"strings"
)

// nodeMounts lists the mount points of the job's mount namespace that a
// dump leaves out (criu.Options.SkipMounts): the nsfs mounts of network
// namespaces (ip netns puts them in /run/netns). They are the node's, which
// the job's namespace inherited when it was made (a job without
// capabilities cannot make one); CRIU cannot dump one the node has no
// longer, and those the node still has come back with the node's tree when
// the job is restored. Nothing for a job that shares cryo's mount
// namespace (CRIU dumps no mounts then).
func nodeMounts(pid int) []string {
	p := "/proc/" + strconv.Itoa(pid)
	theirs, err1 := os.Readlink(p + "/ns/mnt")
	ours, err2 := os.Readlink("/proc/self/ns/mnt")
	if err1 != nil || err2 != nil || theirs == ours {
		return nil
	}
	f, err := os.Open(p + "/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
		line := sc.Text()
		pre, post, ok := strings.Cut(line, " - ")
		fs := strings.Fields(pre)
		if !ok || len(fs) < 5 || !strings.HasPrefix(post, "nsfs ") {
			continue
		}
		out = append(out, unescapeMountinfo(fs[4]))
	}
	return out
}

// unescapeMountinfo undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
