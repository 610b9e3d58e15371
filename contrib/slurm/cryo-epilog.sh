#!/bin/sh
# Slurm Epilog for cryo: after the job ends on this node, ends processes it
# left behind (an orphaned job-init, the remains of a failed restore),
# removes staging leftovers from its store, keeps the checkpoints of a job
# that was stopped for a requeue, and deletes the store of a job that
# completed successfully (CRYO_SLURM_KEEP_ON_SUCCESS=1 keeps it). See
# docs/slurm.md.
#
#   slurm.conf:   Epilog=/etc/slurm/cryo-epilog.sh
#
# slurmd runs this as root with no PATH. Settings are read from
# cryo-slurm.env next to this script, else /etc/default/cryo-slurm (see
# cryo-slurm.env.example). It exits 0 when cryo has trouble, unless
# CRYO_SLURM_STRICT=1.
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
	logger -t cryo-slurm "epilog: $CRYO is not installed; job $SLURM_JOB_ID's store is left as it is" 2>/dev/null
	[ "$CRYO_SLURM_STRICT" = 1 ] && exit 1
	exit 0
fi
exec "$CRYO" slurm epilog
