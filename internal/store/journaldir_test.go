package store

import (
	"os"
	"path/filepath"
	"testing"
)

// An intent journal in staging/journal is not debris: CleanStaging keeps it
// for the recovery that reads it.
func TestCleanStagingKeepsJournals(t *testing.T) {
	s, err := Create(filepath.Join(t.TempDir(), "store"), "test")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(s.JournalDir(), 0o700); err != nil {
		t.Fatal(err)
	}
	j := filepath.Join(s.JournalDir(), "checkpoint-1-2.jsonl")
	if err := os.WriteFile(j, []byte("{}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(s.Dir, "staging", "gen-tmp"), 0o700); err != nil {
		t.Fatal(err)
	}
	n, err := s.CleanStaging()
	if err != nil || n != 1 {
		t.Errorf("CleanStaging = %d, %v; want the one debris entry removed", n, err)
	}
	if _, err := os.Stat(j); err != nil {
		t.Errorf("journal removed: %v", err)
	}
}
