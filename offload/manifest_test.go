package offload

import (
	"reflect"
	"testing"
)

func TestManifestRoundTrip(t *testing.T) {
	recs := []Record{
		{Kind: "cuda", PID: 42, Initial: Running, Devices: []Device{{UUID: "GPU-a", Model: "A100", Index: 3, Memory: 1 << 30}, {UUID: "GPU-b", Model: "A100", Index: 4}}},
		{Kind: "cuda", PID: 43, Initial: Locked, Attrs: map[string]string{"k": "v"}},
	}
	m := ToManifest(recs)
	if m[0].Device != "GPU-a" || m[0].State != "running" || len(m[0].Devices) != 2 || m[1].State != "locked" {
		t.Errorf("manifest entries %+v", m)
	}
	if back := FromManifest(m); !reflect.DeepEqual(back, recs) {
		t.Errorf("round trip:\n got %+v\nwant %+v", back, recs)
	}
}
