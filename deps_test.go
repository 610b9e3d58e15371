package cryo_test

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strings"
	"testing"
)

const module = "github.com/cryo-hpc/cryo"

// layers reads the dependency direction docs/DESIGN.md states ("Dependencies
// point one way: a -> b, c -> ..."): each layer's components, top first. A
// component is a top-level folder (with its subpackages) or "cryo (root)",
// the module's root package alone.
func layers(t *testing.T) [][]string {
	t.Helper()
	b, err := os.ReadFile("docs/DESIGN.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^Dependencies point one way: (.+?)\.?$`).FindSubmatch(b)
	if m == nil {
		t.Fatal(`docs/DESIGN.md has no line "Dependencies point one way: ..."`)
	}
	var out [][]string
	for _, l := range strings.Split(string(m[1]), "->") {
		var comps []string
		for _, c := range strings.FieldsFunc(l, func(r rune) bool { return r == ',' || r == '/' }) {
			c = strings.TrimSpace(c)
			if c == "cryo (root)" {
				c = ""
			}
			comps = append(comps, c)
		}
		out = append(out, comps)
	}
	return out
}

// component is the top-level folder of a package of the module ("" for
// the root package).
func component(pkg string) string {
	rel := strings.TrimPrefix(strings.TrimPrefix(pkg, module), "/")
	c, _, _ := strings.Cut(rel, "/")
	return c
}

// TestDependencyDirection checks, with `go list -deps`, that the packages
// import each other as docs/DESIGN.md says: only downwards, never within a
// layer across components (checkpoint and restore stay apart), no
// component's own package importing its subpackages (offload knows no
// driver), and nothing but cmd/ importing cli. e2e is the test harness
// above all of it.
func TestDependencyDirection(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command to list the packages with")
	}
	rank := map[string]int{}
	for i, l := range layers(t) {
		for _, c := range l {
			rank[c] = i
		}
	}
	cmd := exec.Command("go", "list", "-deps", "-f", `{{if not .Standard}}{{.ImportPath}}{{range .Imports}} {{.}}{{end}}{{end}}`, "./...")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, stderr.String())
	}
	ours := func(p string) bool { return p == module || strings.HasPrefix(p, module+"/") }
	var bad []string
	edges := 0
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || !ours(f[0]) {
			continue
		}
		from := f[0]
		fc := component(from)
		if fc == "e2e" {
			continue
		}
		fr, ok := rank[fc]
		if !ok {
			bad = append(bad, fmt.Sprintf("%s: the component %q is not in docs/DESIGN.md's dependency line", from, fc))
			continue
		}
		for _, to := range f[1:] {
			if !ours(to) {
				continue
			}
			edges++
			tc := component(to)
			tr, ok := rank[tc]
			switch {
			case !ok:
				bad = append(bad, fmt.Sprintf("%s imports %s, whose component %q is not in docs/DESIGN.md's dependency line", from, to, tc))
			case tc == "cli" && fc != "cmd":
				bad = append(bad, fmt.Sprintf("%s imports %s: nothing but cmd/ imports cli", from, to))
			case tc == fc && tc != "" && from == module+"/"+fc:
				bad = append(bad, fmt.Sprintf("%s imports its own subpackage %s", from, to))
			case tc == fc:
				// within a component: offload/cuda uses offload, internal/workdir uses internal/proc
			case tr <= fr:
				bad = append(bad, fmt.Sprintf("%s (%s) imports %s (%s): against the direction docs/DESIGN.md states", from, name(fc), to, name(tc)))
			}
		}
	}
	if edges < 20 {
		t.Fatalf("go list gave %d imports between cryo's packages: not the module's packages?\n%s", edges, out)
	}
	sort.Strings(bad)
	for _, b := range bad {
		t.Error(b)
	}
}

func name(c string) string {
	if c == "" {
		return "cryo (root)"
	}
	return c
}
