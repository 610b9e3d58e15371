package privilege

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestTrusted builds paths whose owners and modes make each case, so it
// needs root (to own files as someone else); CRYO_NO_SKIP=1 makes that a
// failure instead of a skip.
func TestTrusted(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CRYO_NO_SKIP") == "1" {
			t.Fatal("needs root to create files owned by others, and CRYO_NO_SKIP=1 forbids skipping")
		}
		t.Skip("needs root to create files owned by others")
	}
	const nobody = 65534
	top := t.TempDir() // root's, 0700, in sticky /tmp
	mk := func(rel string, mode os.FileMode, uid int, dir bool) string {
		p := filepath.Join(top, rel)
		var err error
		if dir {
			err = os.Mkdir(p, mode)
		} else {
			err = os.WriteFile(p, []byte("#!/bin/sh\n"), mode)
		}
		if err == nil {
			err = os.Chmod(p, mode) // past the umask
		}
		if err == nil {
			err = os.Lchown(p, uid, uid)
		}
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := mk("good", 0o755, 0, false)
	userDir := mk("userdir", 0o755, nobody, true)
	inUserDir := filepath.Join(userDir, "criu")
	if err := os.WriteFile(inUserDir, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	open := mk("open", 0o777, 0, true)
	inOpen := filepath.Join(open, "criu")
	if err := os.WriteFile(inOpen, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	sticky := mk("sticky", os.ModeSticky|0o777, 0, true)
	rootInSticky := filepath.Join(sticky, "criu")
	if err := os.WriteFile(rootInSticky, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	userInSticky := filepath.Join(sticky, "theirs")
	if err := os.WriteFile(userInSticky, nil, 0o755); err != nil || os.Chown(userInSticky, nobody, nobody) != nil {
		t.Fatal("setup")
	}
	writable := mk("writable", 0o666, 0, false)
	link := filepath.Join(top, "link")
	if err := os.Symlink(inUserDir, link); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name, path string
		ok         bool
		says       string
	}{
		{"root's file in root's directories", good, true, ""},
		{"a root-owned file in a sticky directory", rootInSticky, true, ""},
		{"a directory owned by a user", inUserDir, false, "owned by uid 65534"},
		{"a directory anyone may write to", inOpen, false, "others may write to"},
		{"a user's file in a sticky directory", userInSticky, false, "owned by uid 65534"},
		{"a file anyone may write", writable, false, "writable by others"},
		{"a link to a file in a user's directory", link, false, "owned by uid 65534"},
	}
	for _, tc := range tests {
		err := Trusted(tc.path)
		if tc.ok {
			if err != nil {
				t.Errorf("%s: %v, want trusted", tc.name, err)
			}
			continue
		}
		if !errors.Is(err, ErrUntrusted) || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%s: %v, want ErrUntrusted saying %q", tc.name, err, tc.says)
		}
	}
}
