package cli

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
		bad  bool
	}{
		{in: "0", want: 0},
		{in: "4096", want: 4096},
		{in: "512K", want: 512 << 10},
		{in: "8m", want: 8 << 20},
		{in: "16M", want: 16 << 20},
		{in: "2G", want: 2 << 30},
		{in: "512KiB", want: 512 << 10},
		{in: "64MiB", want: 64 << 20},
		{in: "1GiB", want: 1 << 30},
		{in: "iB", bad: true},
		{in: "64iB", bad: true},
		{in: "MiB", bad: true},
		{in: "64MIB", bad: true},
		{in: "64 MiB", bad: true},
		{in: "", bad: true},
		{in: "M", bad: true},
		{in: "-1M", bad: true},
		{in: "1.5M", bad: true},
		{in: "8MB", bad: true},
		{in: " 8M", bad: true},
		{in: "99999999999999999999", bad: true},
		{in: "17179869184G", bad: true}, // overflows 64 bits
	} {
		got, err := parseSize(tc.in)
		if tc.bad != (err != nil) || !tc.bad && got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d (error: %v)", tc.in, got, err, tc.want, tc.bad)
		}
	}
}

// The limits reach the options as numbers and an absolute path, or are
// refused as a usage error naming the flag.
func TestCRIULimits(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "criu.conf")
	if err := os.WriteFile(conf, []byte("skip-in-flight\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l := criuLimits{ghostLimit: "64M", config: conf}
	limit, c, err := l.parse()
	if err != nil || limit != 64<<20 || c != conf {
		t.Errorf("parse() = %d, %q, %v; want 64 MiB and %s", limit, c, err, conf)
	}
	if limit, c, err := (&criuLimits{}).parse(); err != nil || limit != 0 || c != "" {
		t.Errorf("no flags: %d, %q, %v; want CRIU's defaults", limit, c, err)
	}
	for _, bad := range []criuLimits{{ghostLimit: "4G"}, {ghostLimit: "lots"}, {config: filepath.Join(dir, "none.conf")}} {
		var ue usageError
		if _, _, err := bad.parse(); !errors.As(err, &ue) {
			t.Errorf("%+v: %v, want a usage error", bad, err)
		}
	}
	if fs := (&criuLimits{}).flags(false); len(fs) != 1 || fs[0].Names()[0] != "criu-config" {
		t.Errorf("a command that only restores takes --criu-config alone, got %v", fs)
	}
}
