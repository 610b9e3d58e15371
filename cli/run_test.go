package cli

import (
	"slices"
	"testing"
)

func TestSplitCommand(t *testing.T) {
	cases := []struct {
		in   string
		want []string
		bad  bool
	}{
		{in: "worker -addr /tmp/w.sock", want: []string{"worker", "-addr", "/tmp/w.sock"}},
		{in: `  a  'b c'  "d e" f\ g `, want: []string{"a", "b c", "d e", "f g"}},
		{in: `x "it's" 'say "hi"'`, want: []string{"x", "it's", `say "hi"`}},
		{in: `a ''`, want: []string{"a", ""}},
		{in: `a 'b`, bad: true},
		{in: `a b\`, bad: true},
		{in: "", want: nil},
	}
	for _, tc := range cases {
		got, err := splitCommand(tc.in)
		if tc.bad {
			if err == nil {
				t.Errorf("splitCommand(%q) = %q, want an error", tc.in, got)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("splitCommand(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}
