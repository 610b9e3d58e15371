package offload

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// MapEntry is one OLD=NEW item of a device map as a user writes it. Each
// side is a GPU UUID ("GPU-8f40...") or an index: OLD indexes the GPUs as
// they were numbered where the checkpoint was taken, NEW the GPUs of the
// node restoring it.
type MapEntry struct {
	Old string `json:"old"`
	New string `json:"new"`
}

// ParseDeviceMap reads "OLD=NEW,OLD=NEW,...". An empty string is no map.
func ParseDeviceMap(s string) ([]MapEntry, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	var out []MapEntry
	seen := map[string]bool{}
	for _, item := range strings.Split(s, ",") {
		item = strings.TrimSpace(item)
		o, n, ok := strings.Cut(item, "=")
		o, n = strings.TrimSpace(o), strings.TrimSpace(n)
		if !ok || o == "" || n == "" {
			return nil, fmt.Errorf("device map item %q is not OLD=NEW", item)
		}
		for _, side := range []string{o, n} {
			if !isIndex(side) && !looksLikeUUID(side) {
				return nil, fmt.Errorf("device map item %q: %q is neither a GPU index nor a GPU UUID (GPU-...)", item, side)
			}
		}
		if seen[strings.ToLower(o)] {
			return nil, fmt.Errorf("device map names %q twice", o)
		}
		seen[strings.ToLower(o)] = true
		out = append(out, MapEntry{Old: o, New: n})
	}
	return out, nil
}

func isIndex(s string) bool {
	n, err := strconv.Atoi(s)
	return err == nil && n >= 0 && strconv.Itoa(n) == s
}

func looksLikeUUID(s string) bool {
	u := strings.ToUpper(s)
	if !strings.HasPrefix(u, "GPU-") && !strings.HasPrefix(u, "MIG-") {
		return false
	}
	hex := 0
	for _, c := range u[4:] {
		switch {
		case c == '-':
		case c >= '0' && c <= '9', c >= 'A' && c <= 'F':
			hex++
		default:
			return false
		}
	}
	return hex >= 8
}

// Need is one recorded device that a restore must place: the sum of what
// the checkpoint's contexts held on it.
type Need struct {
	UUID   string `json:"uuid"`
	Model  string `json:"model"`
	Index  int    `json:"index"`
	Memory uint64 `json:"memory_bytes"`
}

// Needs sums the recorded devices of contexts by UUID, in index order.
func Needs(recs []Record) []Need {
	by := map[string]*Need{}
	var order []string
	for _, r := range recs {
		for _, d := range r.Devices {
			k := strings.ToLower(d.UUID)
			n, ok := by[k]
			if !ok {
				n = &Need{UUID: d.UUID, Model: d.Model, Index: d.Index}
				by[k] = n
				order = append(order, k)
			}
			n.Memory += d.Memory
		}
	}
	out := make([]Need, 0, len(order))
	for _, k := range order {
		out = append(out, *by[k])
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Index < out[j].Index })
	return out
}

// Plan decides onto which GPU of this node each recorded GPU goes:
//
//  1. what the user map says (each side a UUID or an index), checked;
//  2. else the same GPU, when it is here with room for what was on it;
//  3. else the lowest-indexed GPU of the same model with enough free
//     memory that no other recorded GPU goes to.
//
// Contexts are restored only onto the same model (the CUDA driver
// requires the same chip) and never two recorded GPUs onto one. If some
// recorded GPU has nowhere to go, or the plan moves a GPU while canRemap
// is false, Plan fails with ErrNoMapping (or ErrRemapUnsupported) and a
// message that says why and what to do. The result maps every recorded
// UUID (identity included) and every user entry.
//
// When the records name no devices (the driver could not tell), the user
// map is taken as given, each OLD a UUID.
func Plan(needs []Need, inv Inventory, user []MapEntry) (DeviceMap, error) {
	gpus := inv.GPUs
	byUUID := map[string]int{}
	byIndex := map[int]int{}
	for i, g := range gpus {
		byUUID[strings.ToLower(g.UUID)] = i
		byIndex[g.Index] = i
	}
	findGPU := func(s string) (int, bool) {
		if isIndex(s) {
			n, _ := strconv.Atoi(s)
			i, ok := byIndex[n]
			return i, ok
		}
		i, ok := byUUID[strings.ToLower(s)]
		return i, ok
	}
	findNeed := func(s string) (int, bool) {
		for i, n := range needs {
			if isIndex(s) {
				if strconv.Itoa(n.Index) == s {
					return i, true
				}
			} else if strings.EqualFold(n.UUID, s) {
				return i, true
			}
		}
		return 0, false
	}

	m := DeviceMap{}
	target := make([]int, len(needs)) // index into gpus, -1 unplaced
	for i := range target {
		target[i] = -1
	}
	taken := map[int]string{}             // gpu -> recorded UUID placed there
	assigned := make([]uint64, len(gpus)) // memory placed on each GPU
	var problems []string

	for _, e := range user {
		gi, ok := findGPU(e.New)
		if !ok {
			return nil, fmt.Errorf("%w: device map %s=%s: this node has no GPU %s (%s)", ErrNoMapping, e.Old, e.New, e.New, listGPUs(gpus))
		}
		g := gpus[gi]
		if len(needs) == 0 {
			if isIndex(e.Old) {
				return nil, fmt.Errorf("%w: device map %s=%s: the checkpoint does not record its GPUs, so OLD must be a GPU UUID", ErrNoMapping, e.Old, e.New)
			}
			if prev, dup := taken[gi]; dup {
				return nil, fmt.Errorf("%w: device map sends both %s and %s to GPU %d (%s)", ErrNoMapping, prev, e.Old, g.Index, g.UUID)
			}
			taken[gi] = e.Old
			m[e.Old] = g.UUID
			continue
		}
		ni, ok := findNeed(e.Old)
		if !ok {
			return nil, fmt.Errorf("%w: device map %s=%s: the checkpoint holds no GPU %s (it holds %s)", ErrNoMapping, e.Old, e.New, e.Old, listNeeds(needs))
		}
		n := needs[ni]
		if target[ni] >= 0 {
			return nil, fmt.Errorf("%w: device map names the checkpointed GPU %s twice", ErrNoMapping, n.UUID)
		}
		if prev, dup := taken[gi]; dup {
			return nil, fmt.Errorf("%w: device map sends both %s and %s to GPU %d (%s); each checkpointed GPU needs a GPU of its own", ErrNoMapping, prev, n.UUID, g.Index, g.UUID)
		}
		if n.Model != "" && g.Model != n.Model {
			return nil, fmt.Errorf("%w: device map %s=%s: GPU %d (%s) is a %s but the checkpointed GPU was a %s; CUDA restores only onto the same model",
				ErrNoMapping, e.Old, e.New, g.Index, g.UUID, g.Model, n.Model)
		}
		if !fits(g, assigned[gi], n.Memory) {
			return nil, fmt.Errorf("%w: device map %s=%s: GPU %d (%s) has %s free, the checkpoint needs %s there",
				ErrNoMapping, e.Old, e.New, g.Index, g.UUID, human(g.MemoryFree-min(assigned[gi], g.MemoryFree)), human(n.Memory))
		}
		target[ni], taken[gi] = gi, n.UUID
		assigned[gi] += n.Memory
	}

	// The recorded GPU itself, where it is here with room.
	for ni, n := range needs {
		if target[ni] >= 0 {
			continue
		}
		gi, ok := byUUID[strings.ToLower(n.UUID)]
		if !ok || taken[gi] != "" || !fits(gpus[gi], assigned[gi], n.Memory) {
			continue
		}
		target[ni], taken[gi] = gi, n.UUID
		assigned[gi] += n.Memory
	}
	// Another GPU of the same model, lowest index first.
	order := make([]int, len(gpus))
	for i := range order {
		order[i] = i
	}
	sort.Slice(order, func(a, b int) bool { return gpus[order[a]].Index < gpus[order[b]].Index })
	for ni, n := range needs {
		if target[ni] >= 0 {
			continue
		}
		for _, gi := range order {
			g := gpus[gi]
			if taken[gi] == "" && g.Model == n.Model && fits(g, assigned[gi], n.Memory) {
				target[ni], taken[gi] = gi, n.UUID
				assigned[gi] += n.Memory
				break
			}
		}
		if target[ni] < 0 {
			problems = append(problems, whyNot(n, gpus, byUUID, taken))
		}
	}
	if len(problems) > 0 {
		return nil, fmt.Errorf("%w: %s; give --device-map OLD=NEW to choose", ErrNoMapping, strings.Join(problems, "; "))
	}
	for ni, n := range needs {
		m[n.UUID] = gpus[target[ni]].UUID
	}
	if m.Moves() && !inv.CanRemap {
		why := inv.RemapWhy
		if why == "" {
			why = "the driver cannot restore onto other GPUs"
		}
		return nil, fmt.Errorf("%w: restoring onto other GPUs (%s) is needed, but %s", ErrRemapUnsupported, m.moves(), why)
	}
	return m, nil
}

// moves lists the entries of m that change a device.
func (m DeviceMap) moves() string {
	var parts []string
	for o, n := range m {
		if !strings.EqualFold(o, n) {
			parts = append(parts, o+" -> "+n)
		}
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}

func fits(g GPU, already, need uint64) bool {
	free := g.MemoryFree
	if !g.FreeKnown {
		free = g.MemoryTotal
	}
	if g.MemoryTotal == 0 && !g.FreeKnown {
		return true // the driver does not say: let the restore find out
	}
	return already+need <= free
}

func whyNot(n Need, gpus []GPU, byUUID map[string]int, taken map[int]string) string {
	var why []string
	if gi, ok := byUUID[strings.ToLower(n.UUID)]; !ok {
		why = append(why, "it is not on this node")
	} else if taken[gi] != "" && !strings.EqualFold(taken[gi], n.UUID) {
		why = append(why, "it is taken by "+taken[gi])
	} else {
		why = append(why, fmt.Sprintf("it has only %s free", human(gpus[gi].MemoryFree)))
	}
	var others []string
	for gi, g := range gpus {
		if g.Model != n.Model || strings.EqualFold(g.UUID, n.UUID) {
			continue
		}
		switch {
		case taken[gi] != "":
			others = append(others, fmt.Sprintf("GPU %d is taken by %s", g.Index, taken[gi]))
		default:
			others = append(others, fmt.Sprintf("GPU %d has %s free", g.Index, human(g.MemoryFree)))
		}
	}
	s := fmt.Sprintf("checkpointed GPU %s (%s, %s in use) has nowhere to go: %s", n.UUID, n.Model, human(n.Memory), strings.Join(why, ", "))
	if len(others) == 0 {
		s += fmt.Sprintf(", and no other %s is here", n.Model)
	} else {
		s += fmt.Sprintf(", and no other %s has room (%s)", n.Model, strings.Join(others, ", "))
	}
	return s
}

func listGPUs(gpus []GPU) string {
	if len(gpus) == 0 {
		return "it has none"
	}
	var parts []string
	for _, g := range gpus {
		parts = append(parts, fmt.Sprintf("%d=%s %s", g.Index, g.UUID, g.Model))
	}
	return "GPUs here: " + strings.Join(parts, ", ")
}

func listNeeds(needs []Need) string {
	var parts []string
	for _, n := range needs {
		parts = append(parts, fmt.Sprintf("%d=%s", n.Index, n.UUID))
	}
	return strings.Join(parts, ", ")
}

func human(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// PlanRestore checks, before anything is restored, that the recorded
// contexts of a checkpoint can come back on this node, and decides where
// their devices go (see Plan), asking each kind's driver for this node's
// devices. A checkpoint without contexts needs nothing (and a user map for
// it is a mistake).
func PlanRestore(ctx context.Context, reg *Registry, recs []Record, user []MapEntry) (DeviceMap, error) {
	if len(recs) == 0 {
		if len(user) > 0 {
			return nil, fmt.Errorf("%w: the checkpoint holds no offload contexts, so a device map has nothing to map", ErrNoMapping)
		}
		return nil, nil
	}
	var kinds []string
	byKind := map[string][]Record{}
	for _, r := range recs {
		if _, ok := byKind[r.Kind]; !ok {
			kinds = append(kinds, r.Kind)
		}
		byKind[r.Kind] = append(byKind[r.Kind], r)
	}
	m := DeviceMap{}
	for _, kind := range kinds {
		rs := byKind[kind]
		d, err := reg.Driver(kind)
		if err != nil {
			return nil, err
		}
		inv, err := d.Inventory(ctx)
		if err != nil {
			var pids []string
			for _, r := range rs {
				pids = append(pids, strconv.Itoa(r.PID))
			}
			return nil, fmt.Errorf("the checkpoint holds %s contexts (pid %s): %w", kind, strings.Join(pids, ", "), err)
		}
		km, err := Plan(Needs(rs), inv, user)
		if err != nil {
			return nil, err
		}
		for o, n := range km {
			m[o] = n
		}
	}
	return m, nil
}
