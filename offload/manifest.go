package offload

import "github.com/cryo-hpc/cryo/internal/store"

// ToManifest turns context records into the manifest's offload entries.
func ToManifest(recs []Record) []store.Offload {
	var out []store.Offload
	for _, r := range recs {
		o := store.Offload{Kind: r.Kind, PID: r.PID, JobPID: r.JobPID, State: r.Initial.String(), Attrs: r.Attrs}
		for _, d := range r.Devices {
			o.Devices = append(o.Devices, store.OffloadDevice{UUID: d.UUID, Model: d.Model, Index: d.Index, Memory: d.Memory})
		}
		if len(o.Devices) > 0 {
			o.Device = o.Devices[0].UUID
		}
		out = append(out, o)
	}
	return out
}

// FromManifest turns a manifest's offload entries back into records (their
// start times unknown: the processes are not restored yet).
func FromManifest(entries []store.Offload) []Record {
	var out []Record
	for _, o := range entries {
		r := Record{Kind: o.Kind, PID: o.PID, JobPID: o.JobPID, Attrs: o.Attrs}
		if st, err := ParseState(o.State); err == nil {
			r.Initial = st
		}
		for _, d := range o.Devices {
			r.Devices = append(r.Devices, Device{UUID: d.UUID, Model: d.Model, Index: d.Index, Memory: d.Memory})
		}
		out = append(out, r)
	}
	return out
}
