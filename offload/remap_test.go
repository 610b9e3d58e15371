package offload

import (
	"errors"
	"strings"
	"testing"
)

const (
	gib = uint64(1 << 30)
	a0  = "GPU-a0000000-0000-0000-0000-000000000000"
	a1  = "GPU-a1000000-0000-0000-0000-000000000000"
	a2  = "GPU-a2000000-0000-0000-0000-000000000000"
	h0  = "GPU-b0000000-0000-0000-0000-000000000000"
	old = "GPU-0d000000-0000-0000-0000-000000000000"
)

func gpu(i int, uuid, model string, freeGiB uint64) GPU {
	return GPU{Index: i, UUID: uuid, Model: model, MemoryTotal: 40 * gib, MemoryFree: freeGiB * gib, FreeKnown: true}
}

func TestParseDeviceMap(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []MapEntry
		err  string
	}{
		{in: "", want: nil},
		{in: "0=1", want: []MapEntry{{"0", "1"}}},
		{in: " " + a0 + " = 2 , 1=" + a1, want: []MapEntry{{a0, "2"}, {"1", a1}}},
		{in: "0", err: "not OLD=NEW"},
		{in: "0=", err: "not OLD=NEW"},
		{in: "0=1,0=2", err: "twice"},
		{in: "gpu0=1", err: "neither a GPU index nor a GPU UUID"},
		{in: "-1=1", err: "neither"},
	} {
		got, err := ParseDeviceMap(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseDeviceMap(%q) = %v, %v; want error containing %q", tc.in, got, err, tc.err)
			}
			continue
		}
		if err != nil || len(got) != len(tc.want) {
			t.Errorf("ParseDeviceMap(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
			continue
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Errorf("ParseDeviceMap(%q)[%d] = %v, want %v", tc.in, i, got[i], tc.want[i])
			}
		}
	}
}

func TestNeedsSumsContextsPerGPU(t *testing.T) {
	recs := []Record{
		{PID: 1, Devices: []Device{{UUID: a1, Model: "A100", Index: 1, Memory: 2 * gib}}},
		{PID: 2, Devices: []Device{{UUID: a0, Model: "A100", Index: 0, Memory: gib}, {UUID: a1, Model: "A100", Index: 1, Memory: 3 * gib}}},
	}
	n := Needs(recs)
	if len(n) != 2 || n[0].UUID != a0 || n[1].UUID != a1 || n[1].Memory != 5*gib {
		t.Errorf("needs %+v", n)
	}
}

func TestPlan(t *testing.T) {
	node := []GPU{gpu(0, a0, "A100", 40), gpu(1, a1, "A100", 40), gpu(2, a2, "A100", 1), gpu(3, h0, "H100", 80)}
	need := func(uuid, model string, idx int, memGiB uint64) Need {
		return Need{UUID: uuid, Model: model, Index: idx, Memory: memGiB * gib}
	}
	for _, tc := range []struct {
		name  string
		needs []Need
		gpus  []GPU
		user  string
		remap bool
		want  map[string]string
		err   error
		msg   []string
	}{
		{name: "same GPUs", needs: []Need{need(a0, "A100", 0, 4), need(a1, "A100", 1, 4)}, gpus: node, remap: true,
			want: map[string]string{a0: a0, a1: a1}},
		{name: "same GPUs on an old driver", needs: []Need{need(a0, "A100", 0, 4)}, gpus: node, remap: false,
			want: map[string]string{a0: a0}},
		{name: "missing GPU goes to the lowest free same model", needs: []Need{need(old, "A100", 5, 4), need(a0, "A100", 0, 4)}, gpus: node, remap: true,
			want: map[string]string{old: a1, a0: a0}},
		{name: "GPU without room moves", needs: []Need{need(a2, "A100", 2, 4)}, gpus: node, remap: true,
			want: map[string]string{a2: a0}},
		{name: "too little free memory anywhere", needs: []Need{need(old, "A100", 0, 41)}, gpus: node, remap: true,
			err: ErrNoMapping, msg: []string{old, "nowhere to go", "not on this node", "GPU 0 has 40.0 GiB free", "--device-map"}},
		{name: "no GPU of that model", needs: []Need{need(old, "V100", 0, 1)}, gpus: node, remap: true,
			err: ErrNoMapping, msg: []string{"no other V100 is here"}},
		{name: "move refused on an old driver", needs: []Need{need(old, "A100", 0, 1)}, gpus: node, remap: false,
			err: ErrRemapUnsupported, msg: []string{old + " -> " + a0, "driver too old"}},
		{name: "user map by index", needs: []Need{need(a0, "A100", 0, 4)}, gpus: node, user: "0=1", remap: true,
			want: map[string]string{a0: a1}},
		{name: "user map by UUID", needs: []Need{need(a0, "A100", 0, 4), need(a1, "A100", 1, 4)}, gpus: node, user: a0 + "=" + a1 + "," + a1 + "=" + a0, remap: true,
			want: map[string]string{a0: a1, a1: a0}},
		{name: "user map and automatic placement together", needs: []Need{need(a0, "A100", 0, 4), need(a1, "A100", 1, 4)}, gpus: node, user: "0=1", remap: true,
			want: map[string]string{a0: a1, a1: a0}},
		{name: "user map to another model", needs: []Need{need(a0, "A100", 0, 4)}, gpus: node, user: "0=3", remap: true,
			err: ErrNoMapping, msg: []string{"is a H100 but the checkpointed GPU was a A100"}},
		{name: "user map to a GPU that is not here", needs: []Need{need(a0, "A100", 0, 4)}, gpus: node, user: "0=9", remap: true,
			err: ErrNoMapping, msg: []string{"no GPU 9", "GPUs here: 0=" + a0}},
		{name: "user map from a GPU the checkpoint lacks", needs: []Need{need(a0, "A100", 0, 4)}, gpus: node, user: "4=1", remap: true,
			err: ErrNoMapping, msg: []string{"holds no GPU 4"}},
		{name: "user map sends two GPUs to one", needs: []Need{need(a0, "A100", 0, 4), need(a1, "A100", 1, 4)}, gpus: node, user: "0=1,1=1", remap: true,
			err: ErrNoMapping, msg: []string{"sends both"}},
		{name: "user map onto a full GPU", needs: []Need{need(a0, "A100", 0, 4)}, gpus: node, user: "0=2", remap: true,
			err: ErrNoMapping, msg: []string{"has 1.0 GiB free, the checkpoint needs 4.0 GiB"}},
		{name: "unknown free memory uses the total", needs: []Need{need(old, "A100", 0, 39)}, remap: true,
			gpus: []GPU{{Index: 0, UUID: a0, Model: "A100", MemoryTotal: 40 * gib, MemoryFree: 40 * gib}},
			want: map[string]string{old: a0}},
		{name: "GPUs not recorded: the user map as given", gpus: node, user: old + "=1", remap: true,
			want: map[string]string{old: a1}},
		{name: "GPUs not recorded: an index cannot name them", gpus: node, user: "0=1", remap: true,
			err: ErrNoMapping, msg: []string{"OLD must be a GPU UUID"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			user, err := ParseDeviceMap(tc.user)
			if err != nil {
				t.Fatal(err)
			}
			inv := Inventory{GPUs: tc.gpus, CanRemap: tc.remap}
			if !tc.remap {
				inv.RemapWhy = "driver too old"
			}
			m, err := Plan(tc.needs, inv, user)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("Plan = %v, %v; want %v", m, err, tc.err)
				}
				for _, s := range tc.msg {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("message %q lacks %q", err, s)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(m) != len(tc.want) {
				t.Fatalf("map %v, want %v", m, tc.want)
			}
			for o, n := range tc.want {
				if m[o] != n {
					t.Errorf("%s -> %s, want %s (map %v)", o, m[o], n, m)
				}
			}
		})
	}
}
