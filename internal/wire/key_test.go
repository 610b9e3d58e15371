package wire

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// skipOrFail skips the test with reason, or fails it under CRYO_NO_SKIP=1.
func skipOrFail(t *testing.T, reason string) {
	t.Helper()
	if os.Getenv("CRYO_NO_SKIP") == "1" {
		t.Fatalf("cannot run, and CRYO_NO_SKIP=1 forbids skipping: %s", reason)
	}
	t.Skip(reason)
}

func writeFile(t *testing.T, path string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // past the umask
		t.Fatal(err)
	}
}

func TestLoadKey(t *testing.T) {
	hexKey := []byte("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
	binKey := make([]byte, 257)
	for i := range binKey {
		binKey[i] = byte(i + 33) // starts and ends with no whitespace, holds every other byte
	}
	tests := []struct {
		name    string
		make    func(t *testing.T, path string) // makes the file at path
		want    []byte                          // the key, or nil for an error
		wantErr []string                        // what the error says; "PATH" is the file's path
		is      error                           // what the error matches, if anything
	}{
		{
			name: "hex key and newline",
			make: func(t *testing.T, p string) { writeFile(t, p, append(bytes.Clone(hexKey), '\n'), 0o600) },
			want: hexKey,
		},
		{
			name: "surrounding whitespace trimmed",
			make: func(t *testing.T, p string) { writeFile(t, p, []byte(" \t\r\n"+string(hexKey)+"\n\n \v\f"), 0o600) },
			want: hexKey,
		},
		{
			name: "any bytes",
			make: func(t *testing.T, p string) { writeFile(t, p, binKey, 0o600) },
			want: binKey,
		},
		{
			name: "read-only for the owner",
			make: func(t *testing.T, p string) { writeFile(t, p, hexKey, 0o400) },
			want: hexKey,
		},
		{
			name: "exactly the shortest",
			make: func(t *testing.T, p string) { writeFile(t, p, hexKey[:32], 0o600) },
			want: hexKey[:32],
		},
		{
			name: "exactly the longest",
			make: func(t *testing.T, p string) { writeFile(t, p, bytes.Repeat([]byte{'k'}, 4096), 0o600) },
			want: bytes.Repeat([]byte{'k'}, 4096),
		},
		{
			name:    "mode 0644",
			make:    func(t *testing.T, p string) { writeFile(t, p, hexKey, 0o644) },
			wantErr: []string{"key file PATH: readable by group or others (mode 0644): chmod 600 PATH"},
		},
		{
			name:    "readable by group",
			make:    func(t *testing.T, p string) { writeFile(t, p, hexKey, 0o640) },
			wantErr: []string{"readable by group or others (mode 0640)", "chmod 600 PATH"},
		},
		{
			name:    "writable by others",
			make:    func(t *testing.T, p string) { writeFile(t, p, hexKey, 0o602) },
			wantErr: []string{"writable by group or others (mode 0602)", "chmod 600 PATH"},
		},
		{
			name:    "executable by group",
			make:    func(t *testing.T, p string) { writeFile(t, p, hexKey, 0o610) },
			wantErr: []string{"open to group or others (mode 0610)", "chmod 600 PATH"},
		},
		{
			name: "symbolic link to a good key",
			make: func(t *testing.T, p string) {
				real := p + ".real"
				writeFile(t, real, hexKey, 0o600)
				if err := os.Symlink(real, p); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: []string{"key file PATH: a symbolic link", "name the key file itself"},
		},
		{
			name: "dangling symbolic link",
			make: func(t *testing.T, p string) {
				if err := os.Symlink(p+".nothing", p); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: []string{"key file PATH: a symbolic link"},
		},
		{
			name:    "too short",
			make:    func(t *testing.T, p string) { writeFile(t, p, []byte("  "+string(hexKey[:31])+"\n"), 0o600) },
			wantErr: []string{"key file PATH: too short (31 bytes", "openssl rand -hex 32 > PATH"},
		},
		{
			name:    "empty",
			make:    func(t *testing.T, p string) { writeFile(t, p, nil, 0o600) },
			wantErr: []string{"key file PATH: too short (0 bytes"},
		},
		{
			name:    "too long",
			make:    func(t *testing.T, p string) { writeFile(t, p, bytes.Repeat([]byte{'k'}, 4097), 0o600) },
			wantErr: []string{"key file PATH: too long (4097 bytes"},
		},
		{
			name:    "far too long",
			make:    func(t *testing.T, p string) { writeFile(t, p, make([]byte, 1<<20), 0o600) },
			wantErr: []string{"key file PATH: too long (1048576 bytes"},
		},
		{
			name: "directory",
			make: func(t *testing.T, p string) {
				if err := os.Mkdir(p, 0o700); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: []string{"key file PATH: not a regular file but a directory"},
		},
		{
			name: "named pipe (opening it must not wait for a writer)",
			make: func(t *testing.T, p string) {
				if err := syscall.Mkfifo(p, 0o600); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: []string{"key file PATH: not a regular file but a named pipe"},
		},
		{
			name:    "missing",
			make:    func(t *testing.T, p string) {},
			wantErr: []string{"key file PATH: no such file or directory", "openssl rand -hex 32 > PATH"},
			is:      fs.ErrNotExist,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "key")
			tc.make(t, path)
			done := make(chan struct{})
			var (
				key []byte
				err error
			)
			go func() {
				defer close(done)
				key, err = LoadKey(path)
			}()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("LoadKey blocked")
			}
			if tc.want != nil {
				if err != nil {
					t.Fatalf("LoadKey: %v", err)
				}
				if !bytes.Equal(key, tc.want) {
					t.Fatalf("LoadKey = %q, want %q", key, tc.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("LoadKey = %q, want an error", key)
			}
			checkOneLine(t, err)
			for _, w := range tc.wantErr {
				if w = strings.ReplaceAll(w, "PATH", path); !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %q does not match %v", err, tc.is)
			}
		})
	}
}

func checkOneLine(t *testing.T, err error) {
	t.Helper()
	if strings.ContainsAny(err.Error(), "\r\n") {
		t.Errorf("error is not one line: %q", err)
	}
}

// A key file someone else owns is refused, even when it is mode 0600:
// whoever owns it may change it, or read it. Only root can make a file
// of another user's.
func TestLoadKeyNotOwned(t *testing.T) {
	if os.Geteuid() != 0 {
		skipOrFail(t, "only root can give a file to another user")
	}
	path := filepath.Join(t.TempDir(), "key")
	writeFile(t, path, []byte("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"), 0o600)
	if err := os.Chown(path, 12345, 12345); err != nil {
		t.Fatal(err)
	}
	key, err := LoadKey(path)
	if err == nil {
		t.Fatalf("LoadKey of another user's file = %q, want an error", key)
	}
	checkOneLine(t, err)
	want := "key file " + path + ": owned by uid 12345, not by you (uid 0)"
	if !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not say %q", err, want)
	}
}

func TestNewKey(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "key")
	if err := NewKey(path); err != nil {
		t.Fatalf("NewKey: %v", err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if !fi.Mode().IsRegular() || fi.Mode().Perm()&^0o600 != 0 {
		t.Errorf("NewKey made a file of mode %v, want a regular file of mode 0600", fi.Mode())
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(data) != 65 || data[64] != '\n' || strings.Trim(string(data[:64]), "0123456789abcdef") != "" {
		t.Errorf("NewKey wrote %q, want 64 hex digits and a newline", data)
	}
	key, err := LoadKey(path)
	if err != nil {
		t.Fatalf("LoadKey of a new key: %v", err)
	}
	if !bytes.Equal(key, data[:64]) {
		t.Errorf("LoadKey = %q, want %q", key, data[:64])
	}

	// Another key differs.
	other := filepath.Join(dir, "other")
	if err := NewKey(other); err != nil {
		t.Fatalf("NewKey: %v", err)
	}
	if data2, err := os.ReadFile(other); err != nil || bytes.Equal(data2, data) {
		t.Errorf("two new keys: %q and %q (%v)", data, data2, err)
	}

	// An existing key is never overwritten.
	err = NewKey(path)
	if !errors.Is(err, fs.ErrExist) {
		t.Errorf("NewKey over an existing file: %v, want an error matching fs.ErrExist", err)
	} else {
		checkOneLine(t, err)
	}
	if again, _ := os.ReadFile(path); !bytes.Equal(again, data) {
		t.Errorf("NewKey over an existing file changed it: %q, was %q", again, data)
	}

	// Nor is a symbolic link followed, even a dangling one.
	link := filepath.Join(dir, "link")
	target := filepath.Join(dir, "target")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if err := NewKey(link); !errors.Is(err, fs.ErrExist) {
		t.Errorf("NewKey at a dangling symbolic link: %v, want an error matching fs.ErrExist", err)
	}
	if _, err := os.Lstat(target); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("NewKey at a symbolic link created its target (%v)", err)
	}
}
