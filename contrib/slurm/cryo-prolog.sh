#!/bin/sh
# Slurm Prolog for cryo: prepares the job's checkpoint store
# (STORE_ROOT/cryo-$SLURM_JOB_ID, owned by the job's user, mode 0700),
# ends processes left over from an earlier run of the same job, and records
# the node and its GPUs in the store. See docs/slurm.md.
#
#   slurm.conf:   Prolog=/etc/slurm/cryo-prolog.sh
#
# slurmd runs this as root with no PATH. Settings are read from
# cryo-slurm.env next to this script, else /etc/default/cryo-slurm (see
# cryo-slurm.env.example). It exits 0 when cryo has trouble, so that a node
# is never drained because of cryo, unless CRYO_SLURM_STRICT=1.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
CRYO=/usr/local/bin/cryo
for f in "${0%/*}/cryo-slurm.env" /etc/default/cryo-slurm; do
	if [ -r "$f" ]; then
		set -a
		. "$f"
		set +a
		break
	fi
done
if [ ! -x "$CRYO" ]; then
	logger -t cryo-slurm "prolog: $CRYO is not installed; job $SLURM_JOB_ID runs without a prepared store" 2>/dev/null
	[ "$CRYO_SLURM_STRICT" = 1 ] && exit 1
	exit 0
fi
exec "$CRYO" slurm prolog
