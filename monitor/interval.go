package monitor

import (
	"math"
	"time"
)

// DalyInterval is the checkpoint interval that minimises expected lost work
// for a checkpoint cost delta and a mean time between failures mtbf, by
// Daly's higher-order estimate (J. T. Daly, "A higher order estimate of the
// optimum checkpoint interval for restart dumps", FGCS 2006):
//
//	T = sqrt(2δM)·[1 + (1/3)·sqrt(δ/2M) + (1/9)·(δ/2M)] − δ   for δ < 2M
//	T = M                                                  otherwise
//
// Its first-order term sqrt(2δM) is Young's formula (YoungInterval).
func DalyInterval(delta, mtbf time.Duration) time.Duration {
	d, m := delta.Seconds(), mtbf.Seconds()
	if d <= 0 || m <= 0 {
		return 0
	}
	if d >= 2*m {
		return mtbf
	}
	x := d / (2 * m)
	t := math.Sqrt(2*d*m)*(1+math.Sqrt(x)/3+x/9) - d
	return time.Duration(t * float64(time.Second))
}

// YoungInterval is Young's first-order optimum, sqrt(2·δ·M).
func YoungInterval(delta, mtbf time.Duration) time.Duration {
	d, m := delta.Seconds(), mtbf.Seconds()
	if d <= 0 || m <= 0 {
		return 0
	}
	return time.Duration(math.Sqrt(2*d*m) * float64(time.Second))
}

// costEstimate smooths measured checkpoint costs (an exponentially weighted
// moving average), so one slow checkpoint does not swing the interval.
type costEstimate struct {
	avg time.Duration
	n   int
}

func (c *costEstimate) add(d time.Duration) {
	if d < time.Millisecond {
		d = time.Millisecond
	}
	if c.n == 0 {
		c.avg = d
	} else {
		c.avg = time.Duration(0.7*float64(c.avg) + 0.3*float64(d))
	}
	c.n++
}

// growth fits a least-squares line through (t, v) samples and returns the
// slope in units per second and the fit's R².
func growth(ts []time.Time, vs []float64) (slope, r2 float64) {
	n := float64(len(ts))
	if len(ts) < 3 {
		return 0, 0
	}
	var sx, sy, sxx, sxy, syy float64
	for i := range ts {
		x := ts[i].Sub(ts[0]).Seconds()
		y := vs[i]
		sx += x
		sy += y
		sxx += x * x
		sxy += x * y
		syy += y * y
	}
	den := n*sxx - sx*sx
	if den == 0 {
		return 0, 0
	}
	slope = (n*sxy - sx*sy) / den
	vy := n*syy - sy*sy
	if vy == 0 {
		return slope, 0
	}
	r := (n*sxy - sx*sy) / math.Sqrt(den*vy)
	return slope, r * r
}
