package criu

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
)

// TestOptionsBothWays sets each field of Options alone and checks that it
// changes both the RPC request and the command line: an option added to
// Options but to only one translation (or to neither) fails here.
func TestOptionsBothWays(t *testing.T) {
	dir, other := t.TempDir(), t.TempDir()
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	base := Options{ImagesDir: dir, WorkDir: dir}
	// What each field is set to; a field of a new type fails the test
	// until it is given a value here.
	value := func(name string, typ reflect.Type) (reflect.Value, bool) {
		switch name {
		case "ImagesDir", "WorkDir":
			return reflect.ValueOf(other), true
		case "LogLevel":
			return reflect.ValueOf(2), true
		case "PageServer":
			return reflect.ValueOf(&PageServerAddr{Address: "127.0.0.1", Port: 7}), true
		case "InheritFds":
			return reflect.ValueOf(map[string]*os.File{"pipe:[1]": f}), true
		}
		switch typ.Kind() {
		case reflect.Bool:
			return reflect.ValueOf(true), true
		case reflect.Int:
			return reflect.ValueOf(7), true
		case reflect.Uint32:
			return reflect.ValueOf(uint32(7)), true
		case reflect.String:
			return reflect.ValueOf("x"), true
		case reflect.Slice:
			return reflect.ValueOf([]string{"/x"}), true
		}
		return reflect.Value{}, false
	}
	render := func(o Options) ([]byte, int, []string) {
		ro, open, extra, err := o.request()
		if err != nil {
			t.Fatal(err)
		}
		// The directories reach CRIU as fds: what counts is what they are.
		var dirs []string
		for _, fd := range []int32{ro.GetImagesDirFd(), ro.GetWorkDirFd()} {
			p, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
			if err != nil {
				t.Fatal(err)
			}
			dirs = append(dirs, p)
		}
		closeAll(open)
		ro.ImagesDirFd, ro.WorkDirFd = ptr(int32(0)), nil
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(ro)
		if err != nil {
			t.Fatal(err)
		}
		b = append(b, strings.Join(dirs, "\x00")...)
		args, _ := o.cmdline("restore")
		return b, len(extra), args
	}
	// Fields with nothing to say in one of the forms, and why.
	oneWay := map[string]string{
		"RestoreDetached": "a swrk restore is always detached from CRIU",
	}
	wantRPC, wantExtra, wantArgs := render(base)
	typ := reflect.TypeOf(base)
	for i := range typ.NumField() {
		field := typ.Field(i)
		t.Run(field.Name, func(t *testing.T) {
			v, ok := value(field.Name, field.Type)
			if !ok {
				t.Fatalf("no test value for Options.%s (%s): give it one above", field.Name, field.Type)
			}
			o := base
			reflect.ValueOf(&o).Elem().Field(i).Set(v)
			gotRPC, gotExtra, gotArgs := render(o)
			rpcChanged := string(gotRPC) != string(wantRPC) || gotExtra != wantExtra
			argsChanged := !slices.Equal(gotArgs, wantArgs)
			if why, ok := oneWay[field.Name]; ok {
				if !argsChanged {
					t.Errorf("Options.%s does not reach the command line (%s)", field.Name, why)
				}
				return
			}
			if !rpcChanged {
				t.Errorf("Options.%s does not reach the RPC request", field.Name)
			}
			if !argsChanged {
				t.Errorf("Options.%s does not reach the command line", field.Name)
			}
		})
	}
}

// TestOptionsCRIUKnowsEveryFlag gives the real CRIU every flag the command
// line can carry: each must be one CRIU knows, written as it expects.
func TestOptionsCRIUKnowsEveryFlag(t *testing.T) {
	bin := realCRIU(t).Path
	dir := t.TempDir()
	conf := filepath.Join(dir, "criu.conf")
	if err := os.WriteFile(conf, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	all := Options{ImagesDir: dir, WorkDir: dir, LogFile: "x.log", Unprivileged: true, LeaveRunning: true,
		Timeout: 5, FreezeCgroup: "x", RestoreDetached: true, LazyPages: true, Root: "/", TCPEstablished: true,
		ShellJob: true, FileLocks: true, ExtUnixSockets: true, AutoExtMounts: true, GhostLimit: 1 << 20,
		ConfigFile: conf, External: []string{"mnt[x]:y"}, SkipMounts: []string{"/x"}}
	for _, cmd := range []string{"restore", "lazy-pages"} {
		args, _ := all.cmdline(cmd)
		for _, opt := range options {
			if _, set := opt.arg(&all); !set || (opt.only != nil && !opt.only(&all, cmd)) {
				continue
			}
			if !slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, opt.flag) }) {
				t.Errorf("criu %s: %s is set but not on the command line %q", cmd, opt.flag, args)
			}
		}
		out, _ := exec.Command(bin, args...).CombinedOutput()
		for _, bad := range []string{"unrecognized option", "invalid option", "Usage:", "requires an argument"} {
			if strings.Contains(string(out), bad) {
				t.Errorf("criu %s refuses the command line %q: %s", cmd, args, firstLines(string(out), 3))
			}
		}
	}
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	return strings.Join(lines[:min(n, len(lines))], " | ")
}
