package criu

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/cryo-hpc/cryo/internal/privilege"
)

func TestConfigFile(t *testing.T) {
	if p, err := ConfigFile(""); p != "" || err != nil {
		t.Errorf(`ConfigFile("") = %q, %v; want none`, p, err)
	}
	dir := t.TempDir()
	conf := filepath.Join(dir, "criu.conf")
	if err := os.WriteFile(conf, []byte("skip-in-flight\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{filepath.Join(dir, "missing.conf"), dir} {
		if _, err := ConfigFile(bad); !errors.Is(err, ErrBadConfig) {
			t.Errorf("ConfigFile(%s) = %v, want ErrBadConfig", bad, err)
		}
	}
	wd, _ := os.Getwd()
	rel, err := filepath.Rel(wd, conf)
	if err != nil {
		t.Fatal(err)
	}
	// Under directories root alone may change (t.TempDir's, as root), or
	// as a user, whose CRIU runs as themselves: usable, by its absolute path.
	if p, err := ConfigFile(rel); err != nil || p != conf {
		t.Errorf("ConfigFile(%s) = %q, %v; want %s", rel, p, err, conf)
	}
	if !privilege.Root() {
		return
	}
	// As root, a configuration others may write would run their code
	// (--action-script): refused.
	if err := os.Chmod(conf, 0o666); err != nil {
		t.Fatal(err)
	}
	if _, err := ConfigFile(conf); !errors.Is(err, ErrBadConfig) || !errors.Is(err, privilege.ErrUntrusted) {
		t.Errorf("as root, a configuration others may write: %v, want ErrBadConfig and ErrUntrusted", err)
	}
}
