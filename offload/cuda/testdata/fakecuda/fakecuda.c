/*
 * fakecuda.c: a strict fake of the CUDA driver (libcuda.so.1) for tests on
 * machines without a GPU. Build:
 *
 *   gcc -shared -fPIC -O2 -pthread -o libcuda.so.1 fakecuda.c
 *
 * It fakes two sides of the driver:
 *
 * The application side: cuInit, devices, contexts, cuMemAlloc,
 * cuMemcpyHtoD/DtoH, cuCtxSynchronize and an asynchronous fake kernel
 * launch (fakeLaunchKernel). Device memory lives in files under
 * $FAKECUDA_ROOT/mem/<GPU UUID>/ (see fakegpu.h), never in the process's
 * address space, and is reclaimed when its owner process is gone. The first
 * context starts two threads in the process: "fakecuda-gpu" runs launched
 * kernels in order, and "fakecuda-drv" is the driver thread (the real
 * driver's restore thread, cuCheckpointProcessGetRestoreThreadId) that
 * carries out checkpoint requests inside the process.
 *
 * The controller side: the cuCheckpointProcess* API called by another
 * process (cryo) with a target pid. The controller validates the argument
 * structs (64 bytes, reserved fields zero, the restore layout of the
 * configured driver version), then asks the target's driver thread through
 * the mailbox $FAKECUDA_ROOT/proc/<name>/ (req and resp files, a wake-up
 * signal) and waits for its answer. The target pid is as the caller sees it;
 * <name> is the target's name in the fake (see fakegpu.h), the same whether
 * the target is in the caller's PID namespace or in one of its own.
 *
 * The state machine is the documented one and is enforced:
 *
 *   RUNNING --lock--> LOCKED --checkpoint--> CHECKPOINTED --restore--> LOCKED --unlock--> RUNNING
 *
 * Any other transition is CUDA_ERROR_ILLEGAL_STATE. Lock blocks new API
 * calls in the target and waits (up to timeoutMs, 0 = forever) for calls in
 * flight and launched kernels to drain; on timeout the target stays RUNNING
 * and the result is CUDA_ERROR_TIMEOUT. Checkpoint copies each context's
 * device memory into malloc'd memory of the target and releases the device
 * files; restore writes it back onto the same GPUs, or onto the GPUs the
 * (old UUID, new UUID) pairs name (driver version >= 13000 only), and fails
 * with CUDA_ERROR_OUT_OF_MEMORY when a target GPU lacks room.
 *
 * A process whose contexts were not restored by the driver (e.g. a CRIU
 * restore without the CUDA checkpoint) finds its device memory gone: every
 * API call then fails with CUDA_ERROR_DEVICE_UNAVAILABLE.
 *
 * Failures and delays are injected through $FAKECUDA_ROOT/inject, read at
 * each request ("key=value" lines; codes are CUresult numbers):
 *   lock_fail=CODE        lock fails, target stays RUNNING
 *   checkpoint_fail=CODE  checkpoint fails, target stays LOCKED
 *   checkpoint_delay_ms=N checkpoint waits N ms before it starts
 *   restore_fail=CODE     restore fails, target stays CHECKPOINTED
 *   unlock_fail=CODE      unlock fails, target stays LOCKED
 *   kernel_ms=N           each kernel runs N ms longer
 *   busy_ms=N             a lock finds work in flight that drains N ms later
 *                         (a long kernel caught at any moment)
 */
#include "fakegpu.h"

#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct fc_ctx *CUcontext;
typedef struct {
	char bytes[16];
} CUuuid;

enum {
	CUDA_SUCCESS = 0,
	CUDA_ERROR_INVALID_VALUE = 1,
	CUDA_ERROR_OUT_OF_MEMORY = 2,
	CUDA_ERROR_NOT_INITIALIZED = 3,
	CUDA_ERROR_DEVICE_UNAVAILABLE = 46,
	CUDA_ERROR_NO_DEVICE = 100,
	CUDA_ERROR_INVALID_DEVICE = 101,
	CUDA_ERROR_INVALID_CONTEXT = 201,
	CUDA_ERROR_OPERATING_SYSTEM = 304,
	CUDA_ERROR_ILLEGAL_STATE = 401,
	CUDA_ERROR_NOT_FOUND = 500,
	CUDA_ERROR_NOT_READY = 600,
	CUDA_ERROR_LAUNCH_FAILED = 719,
	CUDA_ERROR_NOT_SUPPORTED = 801,
	CUDA_ERROR_TIMEOUT = 909,
	CUDA_ERROR_UNKNOWN = 999,
};

enum { ST_RUNNING = 0, ST_LOCKED = 1, ST_CHECKPOINTED = 2, ST_FAILED = 3 };

/* The argument structs, as cuda.h lays them out: 64 bytes each. */
typedef struct {
	unsigned int timeoutMs;
	unsigned int reserved0;
	unsigned long long reserved1[7];
} CUcheckpointLockArgs;
typedef struct {
	unsigned long long reserved[8];
} CUcheckpointCheckpointArgs;
typedef struct {
	unsigned long long reserved[8];
} CUcheckpointUnlockArgs;
typedef struct {
	CUuuid oldUuid;
	CUuuid newUuid;
} CUcheckpointGpuPair;
/* Restore args: CUDA 12.8 and 12.9 have only reserved[8]; from CUDA 13.0 the
 * struct starts with the GPU pairs pointer and count, and every other byte is
 * reserved (spelled differently by later headers, zero in all of them). */
typedef struct {
	CUcheckpointGpuPair *gpuPairs;
	unsigned int gpuPairsCount;
	char reserved[44];
	unsigned long long reserved1;
} CUcheckpointRestoreArgs13;

_Static_assert(sizeof(CUcheckpointLockArgs) == 64, "lock args");
_Static_assert(sizeof(CUcheckpointCheckpointArgs) == 64, "checkpoint args");
_Static_assert(sizeof(CUcheckpointUnlockArgs) == 64, "unlock args");
_Static_assert(sizeof(CUcheckpointRestoreArgs13) == 64, "restore args");
_Static_assert(offsetof(CUcheckpointRestoreArgs13, gpuPairsCount) == 8, "restore args count");
_Static_assert(sizeof(CUcheckpointGpuPair) == 32, "gpu pair");

#define EXPORT __attribute__((visibility("default")))
#define MAX_CTX 8
#define QLEN 64
#define DRV_NAME "fakecuda-drv"
#define GPU_NAME "fakecuda-gpu"
#define WAKE_SIG (SIGRTMIN + 5)

struct fc_ctx {
	int used, id, dev;
	char uuid[64];
	char model[96];
	unsigned long long start; /* owner start time, part of the memory file's name */
	unsigned long long size;  /* bytes allocated (a bump allocator) */
	unsigned char *host;      /* the device memory while CHECKPOINTED */
};

struct fc_work {
	struct fc_ctx *c;
	CUdeviceptr p;
	size_t n;
	unsigned long long arg;
	int kernel;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static struct fg_world W;
static int inited;
static int pstate = ST_RUNNING;
static int locking;  /* a lock is draining: new calls wait */
static int inflight; /* API calls in progress */
static struct fc_ctx ctxs[MAX_CTX];
static __thread struct fc_ctx *cur;
static struct fc_work q[QLEN];
static int qhead, qtail, qbusy;
static CUresult async_err; /* sticky error of a kernel, reported by the next synchronous call */
static int threads_started;

/* ---------------------------------------------------------------- helpers */

static unsigned long long self_start(void) { return fg_proc_start(0); }

/* self_name is this process's name to the fake (see fakegpu.h), computed
 * afresh: a process that CRIU restored in a new PID namespace has another. */
static void self_name(char *out, size_t len)
{
	struct fg_name n;
	if (fg_name_of(0, &n) != 0)
		n = (struct fg_name){ 0, (int)getpid() };
	fg_name_format(&n, out, len);
}

static CUdeviceptr ctx_base(const struct fc_ctx *c) { return (CUdeviceptr)(c->id + 1) << 40; }

static void memfile_path(const struct fc_ctx *c, char *out, size_t len)
{
	char name[64];
	self_name(name, sizeof(name));
	snprintf(out, len, "%s/mem/%s/%s.%llu.%d", W.root, c->uuid, name, c->start, c->id);
}

static int queue_idle(void) { return qhead == qtail && !qbusy; }

/* enter is the gate of every application call that touches the GPU: it
 * blocks while the process is locked or being locked. */
static CUresult enter(void)
{
	if (!inited)
		return CUDA_ERROR_NOT_INITIALIZED;
	pthread_mutex_lock(&mu);
	while (pstate == ST_LOCKED || pstate == ST_CHECKPOINTED || locking)
		pthread_cond_wait(&cv, &mu);
	if (pstate == ST_FAILED) {
		pthread_mutex_unlock(&mu);
		return CUDA_ERROR_UNKNOWN;
	}
	inflight++;
	pthread_mutex_unlock(&mu);
	return CUDA_SUCCESS;
}

static CUresult leave(CUresult r)
{
	pthread_mutex_lock(&mu);
	inflight--;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	return r;
}

/* drain waits until every launched kernel has run; mu must not be held. */
static CUresult drain(void)
{
	pthread_mutex_lock(&mu);
	while (!queue_idle())
		pthread_cond_wait(&cv, &mu);
	CUresult r = async_err;
	pthread_mutex_unlock(&mu);
	return r;
}

/* dev_io reads or writes device memory of c at byte offset off. */
static CUresult dev_io(struct fc_ctx *c, int write, unsigned long long off, void *buf, size_t n)
{
	if (!fg_same_start(c->start, self_start()))
		return CUDA_ERROR_DEVICE_UNAVAILABLE; /* the handles died with the old process */
	char p[PATH_MAX + 128];
	memfile_path(c, p, sizeof(p));
	int fd = open(p, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return CUDA_ERROR_DEVICE_UNAVAILABLE;
	size_t done = 0;
	while (done < n) {
		ssize_t k = write ? pwrite(fd, (char *)buf + done, n - done, (off_t)(off + done))
				  : pread(fd, (char *)buf + done, n - done, (off_t)(off + done));
		if (k <= 0) {
			close(fd);
			return CUDA_ERROR_DEVICE_UNAVAILABLE;
		}
		done += (size_t)k;
	}
	close(fd);
	return CUDA_SUCCESS;
}

static struct fc_ctx *ctx_of(CUdeviceptr p, size_t n, unsigned long long *off)
{
	for (int i = 0; i < MAX_CTX; i++) {
		struct fc_ctx *c = &ctxs[i];
		CUdeviceptr b = ctx_base(c);
		if (c->used && p >= b && p + n <= b + c->size && p + n >= p) {
			*off = p - b;
			return c;
		}
	}
	return NULL;
}

/* ------------------------------------------------------------ the kernels */

/* kernel 1, "mix": every 64-bit word w at word index i of the range becomes
 * rotl(w * 6364136223846793005 + arg + i, 17). */
static CUresult run_mix(struct fc_ctx *c, unsigned long long off, size_t n, unsigned long long arg)
{
	const size_t chunk = 1 << 20;
	unsigned long long *buf = malloc(chunk);
	if (buf == NULL)
		return CUDA_ERROR_OUT_OF_MEMORY;
	CUresult r = CUDA_SUCCESS;
	for (size_t done = 0; done < n && r == CUDA_SUCCESS; done += chunk) {
		size_t k = n - done < chunk ? n - done : chunk;
		if ((r = dev_io(c, 0, off + done, buf, k)) != CUDA_SUCCESS)
			break;
		for (size_t j = 0; j < k / 8; j++) {
			unsigned long long w = buf[j] * 6364136223846793005ULL + arg + (done / 8 + j);
			buf[j] = (w << 17) | (w >> 47);
		}
		r = dev_io(c, 1, off + done, buf, k);
	}
	free(buf);
	return r;
}

/* name_self names the calling thread, and says so. A thread names itself:
 * pthread_setname_np on another thread goes through /proc/self/task/<tid>
 * with its tid in the process's own PID namespace, which names another
 * thread, or none, where /proc is of another namespace. */
static void name_self(const char *name, int *named)
{
	prctl(PR_SET_NAME, name, 0, 0, 0);
	__atomic_store_n(named, 1, __ATOMIC_SEQ_CST);
}

static int gpu_named, drv_named;

static void *gpu_main(void *unused)
{
	(void)unused;
	sigset_t all;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	name_self(GPU_NAME, &gpu_named);
	for (;;) {
		pthread_mutex_lock(&mu);
		while (qhead == qtail)
			pthread_cond_wait(&cv, &mu);
		struct fc_work w = q[qhead % QLEN];
		qbusy = 1;
		qhead++;
		pthread_mutex_unlock(&mu);

		fg_sleep_ms(fg_inject(&W, "kernel_ms", 0));
		CUresult r = w.kernel == 1 ? run_mix(w.c, w.p - ctx_base(w.c), w.n, w.arg) : CUDA_ERROR_LAUNCH_FAILED;

		pthread_mutex_lock(&mu);
		if (r != CUDA_SUCCESS && async_err == CUDA_SUCCESS)
			async_err = r;
		qbusy = 0;
		pthread_cond_broadcast(&cv);
		pthread_mutex_unlock(&mu);
	}
	return NULL;
}

/* ----------------------------------------------- driver thread (target side) */

static int drained(long long busy_until) { return inflight == 0 && queue_idle() && fg_now_ms() >= busy_until; }

static CUresult do_lock(unsigned int timeout_ms)
{
	long long code = fg_inject(&W, "lock_fail", 0);
	long long busy_until = fg_now_ms() + fg_inject(&W, "busy_ms", 0);
	pthread_mutex_lock(&mu);
	if (pstate != ST_RUNNING) {
		pthread_mutex_unlock(&mu);
		return CUDA_ERROR_ILLEGAL_STATE;
	}
	if (code != 0) {
		pthread_mutex_unlock(&mu);
		return (CUresult)code;
	}
	locking = 1;
	struct timespec deadline;
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += timeout_ms / 1000;
	deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (deadline.tv_nsec >= 1000000000L) {
		deadline.tv_sec++;
		deadline.tv_nsec -= 1000000000L;
	}
	while (!drained(busy_until)) {
		/* Wake at least every 10 ms: busy_ms ends without a signal. */
		struct timespec tick;
		clock_gettime(CLOCK_REALTIME, &tick);
		tick.tv_nsec += 10 * 1000000L;
		if (tick.tv_nsec >= 1000000000L) {
			tick.tv_sec++;
			tick.tv_nsec -= 1000000000L;
		}
		int past = timeout_ms > 0 && (tick.tv_sec > deadline.tv_sec || (tick.tv_sec == deadline.tv_sec && tick.tv_nsec >= deadline.tv_nsec));
		int e = pthread_cond_timedwait(&cv, &mu, past ? &deadline : &tick);
		if (e == ETIMEDOUT && past && !drained(busy_until)) {
			locking = 0;
			pthread_cond_broadcast(&cv);
			pthread_mutex_unlock(&mu);
			return CUDA_ERROR_TIMEOUT; /* still RUNNING */
		}
	}
	pstate = ST_LOCKED;
	locking = 0;
	pthread_mutex_unlock(&mu);
	return CUDA_SUCCESS;
}

static CUresult do_checkpoint(void)
{
	pthread_mutex_lock(&mu);
	int st = pstate;
	pthread_mutex_unlock(&mu);
	if (st != ST_LOCKED)
		return CUDA_ERROR_ILLEGAL_STATE;
	fg_sleep_ms(fg_inject(&W, "checkpoint_delay_ms", 0));
	long long code = fg_inject(&W, "checkpoint_fail", 0);
	if (code != 0)
		return (CUresult)code; /* still LOCKED */

	/* Copy every context's device memory into host memory first; release
	 * the device only when all copies succeeded. */
	for (int i = 0; i < MAX_CTX; i++) {
		struct fc_ctx *c = &ctxs[i];
		if (!c->used)
			continue;
		c->host = malloc(c->size ? c->size : 1);
		CUresult r = c->host == NULL ? CUDA_ERROR_OUT_OF_MEMORY : dev_io(c, 0, 0, c->host, c->size);
		if (r != CUDA_SUCCESS) {
			for (int j = 0; j <= i; j++) {
				free(ctxs[j].host);
				ctxs[j].host = NULL;
			}
			return r;
		}
	}
	for (int i = 0; i < MAX_CTX; i++) {
		if (!ctxs[i].used)
			continue;
		char p[PATH_MAX + 128];
		memfile_path(&ctxs[i], p, sizeof(p));
		unlink(p);
	}
	pthread_mutex_lock(&mu);
	pstate = ST_CHECKPOINTED;
	pthread_mutex_unlock(&mu);
	return CUDA_SUCCESS;
}

static CUresult do_restore(int npairs, char (*olds)[64], char (*news)[64])
{
	pthread_mutex_lock(&mu);
	int st = pstate;
	pthread_mutex_unlock(&mu);
	if (st != ST_CHECKPOINTED)
		return CUDA_ERROR_ILLEGAL_STATE;
	long long code = fg_inject(&W, "restore_fail", 0);
	if (code != 0)
		return (CUresult)code; /* still CHECKPOINTED */

	struct fg_world now;
	if (fg_load(&now) != 0)
		return CUDA_ERROR_NO_DEVICE;
	/* Where does each context go? Every pair's old GPU must be distinct, and
	 * with pairs given every checkpointed GPU must be named. */
	int target[MAX_CTX];
	unsigned long long need[FG_MAX_GPUS] = { 0 };
	for (int a = 0; a < npairs; a++)
		for (int b = a + 1; b < npairs; b++)
			if (strcasecmp(olds[a], olds[b]) == 0 || strcasecmp(news[a], news[b]) == 0)
				return CUDA_ERROR_INVALID_VALUE;
	for (int i = 0; i < MAX_CTX; i++) {
		struct fc_ctx *c = &ctxs[i];
		target[i] = -1;
		if (!c->used)
			continue;
		const char *to = c->uuid;
		if (npairs > 0) {
			to = NULL;
			for (int k = 0; k < npairs; k++)
				if (strcasecmp(olds[k], c->uuid) == 0)
					to = news[k];
			if (to == NULL)
				return CUDA_ERROR_INVALID_VALUE;
		}
		int gi = fg_find_uuid(&now, to);
		if (gi < 0)
			return CUDA_ERROR_INVALID_DEVICE;
		if (strcmp(now.g[gi].model, c->model) != 0)
			return CUDA_ERROR_INVALID_DEVICE; /* not the same chip */
		target[i] = gi;
		need[gi] += c->size;
	}
	for (int gi = 0; gi < now.n; gi++)
		if (need[gi] > 0 && fg_scan(&now, gi, NULL, NULL) + need[gi] > now.g[gi].total)
			return CUDA_ERROR_OUT_OF_MEMORY;

	unsigned long long start = self_start();
	for (int i = 0; i < MAX_CTX; i++) {
		struct fc_ctx *c = &ctxs[i];
		if (!c->used)
			continue;
		struct fc_ctx n = *c;
		snprintf(n.uuid, sizeof(n.uuid), "%s", now.g[target[i]].uuid);
		n.dev = target[i];
		n.start = start;
		char dir[PATH_MAX], p[PATH_MAX + 128];
		fg_mem_dir(&now, n.uuid, dir, sizeof(dir));
		fg_mkdirs(dir);
		memfile_path(&n, p, sizeof(p));
		int fd = open(p, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		if (fd < 0 || ftruncate(fd, (off_t)n.size) != 0) {
			if (fd >= 0)
				close(fd);
			return CUDA_ERROR_OPERATING_SYSTEM;
		}
		close(fd);
		*c = n;
		CUresult r = dev_io(c, 1, 0, c->host, c->size);
		if (r != CUDA_SUCCESS)
			return r;
	}
	for (int i = 0; i < MAX_CTX; i++) {
		free(ctxs[i].host);
		ctxs[i].host = NULL;
	}
	pthread_mutex_lock(&mu);
	pstate = ST_LOCKED;
	pthread_mutex_unlock(&mu);
	return CUDA_SUCCESS;
}

static CUresult do_unlock(void)
{
	long long code = fg_inject(&W, "unlock_fail", 0);
	pthread_mutex_lock(&mu);
	if (pstate != ST_LOCKED) {
		pthread_mutex_unlock(&mu);
		return CUDA_ERROR_ILLEGAL_STATE;
	}
	if (code != 0) {
		pthread_mutex_unlock(&mu);
		return (CUresult)code;
	}
	pstate = ST_RUNNING;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	return CUDA_SUCCESS;
}

static void mailbox_dir(const char *name, char *out, size_t len) { snprintf(out, len, "%s/proc/%s", W.root, name); }

/* serve answers one request from the mailbox, if there is one. Request:
 * "SEQ OP TIMEOUT_MS NPAIRS [OLD NEW]...", answer: "SEQ RESULT STATE". */
static void serve(void)
{
	char dir[PATH_MAX], req[PATH_MAX + 16], resp[PATH_MAX + 16], name[64];
	self_name(name, sizeof(name));
	mailbox_dir(name, dir, sizeof(dir));
	snprintf(req, sizeof(req), "%s/req", dir);
	snprintf(resp, sizeof(resp), "%s/resp", dir);
	FILE *f = fopen(req, "re");
	if (f == NULL)
		return;
	unlink(req);
	unsigned long long seq;
	char op;
	unsigned int timeout;
	int npairs;
	char olds[FG_MAX_GPUS][64], news[FG_MAX_GPUS][64];
	int ok = fscanf(f, "%llu %c %u %d", &seq, &op, &timeout, &npairs) == 4 && npairs >= 0 && npairs <= FG_MAX_GPUS;
	for (int i = 0; ok && i < npairs; i++)
		ok = fscanf(f, "%63s %63s", olds[i], news[i]) == 2;
	fclose(f);
	if (!ok)
		return;

	CUresult r;
	switch (op) {
	case 'S': r = CUDA_SUCCESS; break;
	case 'L': r = do_lock(timeout); break;
	case 'C': r = do_checkpoint(); break;
	case 'R': r = do_restore(npairs, olds, news); break;
	case 'U': r = do_unlock(); break;
	default: r = CUDA_ERROR_INVALID_VALUE;
	}
	pthread_mutex_lock(&mu);
	int st = pstate;
	pthread_mutex_unlock(&mu);
	char text[128];
	snprintf(text, sizeof(text), "%llu %d %d\n", seq, r, st);
	fg_write_atomic(resp, text);
}

static void *drv_main(void *unused)
{
	(void)unused;
	sigset_t all, wake;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	sigemptyset(&wake);
	sigaddset(&wake, WAKE_SIG);
	name_self(DRV_NAME, &drv_named);
	for (;;) {
		/* Wake on the controller's signal, or look every 100 ms anyway. */
		struct timespec ts = { 0, 100 * 1000000L };
		sigtimedwait(&wake, NULL, &ts);
		serve();
	}
	return NULL;
}

static int start_threads(void)
{
	if (threads_started)
		return 0;
	/* The threads start with every signal blocked: a controller's wake-up
	 * signal must never find the driver thread without its mask (its
	 * default action would kill the process). */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	pthread_t g, d;
	int err = pthread_create(&g, NULL, gpu_main, NULL);
	if (err == 0) {
		pthread_detach(g);
		err = pthread_create(&d, NULL, drv_main, NULL);
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err != 0)
		return -1;
	pthread_detach(d);
	/* A controller finds the driver thread by its name: it has it before
	 * the first context exists. */
	while (!__atomic_load_n(&gpu_named, __ATOMIC_SEQ_CST) || !__atomic_load_n(&drv_named, __ATOMIC_SEQ_CST))
		fg_sleep_ms(1);
	threads_started = 1;
	return 0;
}

/* ------------------------------------------------------- application API */

EXPORT CUresult cuInit(unsigned int flags)
{
	if (flags != 0)
		return CUDA_ERROR_INVALID_VALUE;
	pthread_mutex_lock(&mu);
	if (!inited) {
		if (fg_load(&W) != 0) {
			pthread_mutex_unlock(&mu);
			return CUDA_ERROR_NO_DEVICE;
		}
		inited = 1;
	}
	pthread_mutex_unlock(&mu);
	return CUDA_SUCCESS;
}

EXPORT CUresult cuDriverGetVersion(int *v)
{
	if (v == NULL)
		return CUDA_ERROR_INVALID_VALUE;
	struct fg_world w;
	fg_load(&w);
	*v = w.cuda_version;
	return CUDA_SUCCESS;
}

static const struct {
	int code;
	const char *name, *text;
} errors[] = {
	{ CUDA_SUCCESS, "CUDA_SUCCESS", "no error" },
	{ CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument" },
	{ CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory" },
	{ CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error" },
	{ CUDA_ERROR_DEVICE_UNAVAILABLE, "CUDA_ERROR_DEVICE_UNAVAILABLE", "CUDA-capable device(s) is/are busy or unavailable" },
	{ CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected" },
	{ CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal" },
	{ CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context" },
	{ CUDA_ERROR_OPERATING_SYSTEM, "CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS" },
	{ CUDA_ERROR_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state" },
	{ CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found" },
	{ CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready" },
	{ CUDA_ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure" },
	{ CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported" },
	{ CUDA_ERROR_TIMEOUT, "CUDA_ERROR_TIMEOUT", "timeout" },
	{ CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error" },
};

EXPORT CUresult cuGetErrorName(CUresult e, const char **s)
{
	if (s == NULL)
		return CUDA_ERROR_INVALID_VALUE;
	for (size_t i = 0; i < sizeof(errors) / sizeof(errors[0]); i++)
		if (errors[i].code == e) {
			*s = errors[i].name;
			return CUDA_SUCCESS;
		}
	*s = NULL;
	return CUDA_ERROR_INVALID_VALUE;
}

EXPORT CUresult cuGetErrorString(CUresult e, const char **s)
{
	if (s == NULL)
		return CUDA_ERROR_INVALID_VALUE;
	for (size_t i = 0; i < sizeof(errors) / sizeof(errors[0]); i++)
		if (errors[i].code == e) {
			*s = errors[i].text;
			return CUDA_SUCCESS;
		}
	*s = NULL;
	return CUDA_ERROR_INVALID_VALUE;
}

EXPORT CUresult cuDeviceGetCount(int *n)
{
	if (!inited)
		return CUDA_ERROR_NOT_INITIALIZED;
	if (n == NULL)
		return CUDA_ERROR_INVALID_VALUE;
	*n = W.n;
	return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGet(CUdevice *d, int ordinal)
{
	if (!inited)
		return CUDA_ERROR_NOT_INITIALIZED;
	if (d == NULL)
		return CUDA_ERROR_INVALID_VALUE;
	if (ordinal < 0 || ordinal >= W.n)
		return CUDA_ERROR_INVALID_DEVICE;
	*d = ordinal;
	return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetName(char *name, int len, CUdevice d)
{
	if (!inited)
		return CUDA_ERROR_NOT_INITIALIZED;
	if (name == NULL || len <= 0)
		return CUDA_ERROR_INVALID_VALUE;
	if (d < 0 || d >= W.n)
		return CUDA_ERROR_INVALID_DEVICE;
	snprintf(name, (size_t)len, "%s", W.g[d].model);
	return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetUuid_v2(CUuuid *u, CUdevice d)
{
	if (!inited)
		return CUDA_ERROR_NOT_INITIALIZED;
	if (u == NULL)
		return CUDA_ERROR_INVALID_VALUE;
	if (d < 0 || d >= W.n)
		return CUDA_ERROR_INVALID_DEVICE;
	memcpy(u->bytes, W.g[d].raw, 16);
	return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetUuid(CUuuid *u, CUdevice d) { return cuDeviceGetUuid_v2(u, d); }

EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d)
{
	if (!inited)
		return CUDA_ERROR_NOT_INITIALIZED;
	if (bytes == NULL)
		return CUDA_ERROR_INVALID_VALUE;
	if (d < 0 || d >= W.n)
		return CUDA_ERROR_INVALID_DEVICE;
	*bytes = (size_t)W.g[d].total;
	return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice d)
{
	(void)flags;
	if (pctx == NULL)
		return CUDA_ERROR_INVALID_VALUE;
	CUresult r = enter();
	if (r != CUDA_SUCCESS)
		return r;
	if (d < 0 || d >= W.n)
		return leave(CUDA_ERROR_INVALID_DEVICE);
	pthread_mutex_lock(&mu);
	struct fc_ctx *c = NULL;
	for (int i = 0; i < MAX_CTX && c == NULL; i++)
		if (!ctxs[i].used)
			c = &ctxs[i];
	if (c == NULL || start_threads() != 0) {
		pthread_mutex_unlock(&mu);
		return leave(CUDA_ERROR_OUT_OF_MEMORY);
	}
	memset(c, 0, sizeof(*c));
	c->id = (int)(c - ctxs);
	c->dev = d;
	snprintf(c->uuid, sizeof(c->uuid), "%s", W.g[d].uuid);
	snprintf(c->model, sizeof(c->model), "%s", W.g[d].model);
	c->start = self_start();
	char dir[PATH_MAX], p[PATH_MAX + 128];
	fg_mem_dir(&W, c->uuid, dir, sizeof(dir));
	fg_mkdirs(dir);
	memfile_path(c, p, sizeof(p));
	int fd = open(p, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		pthread_mutex_unlock(&mu);
		return leave(CUDA_ERROR_OPERATING_SYSTEM);
	}
	close(fd);
	c->used = 1;
	pthread_mutex_unlock(&mu);
	cur = c;
	*pctx = c;
	return leave(CUDA_SUCCESS);
}

EXPORT CUresult cuCtxCreate(CUcontext *pctx, unsigned int flags, CUdevice d) { return cuCtxCreate_v2(pctx, flags, d); }

EXPORT CUresult cuCtxSetCurrent(CUcontext c)
{
	if (!inited)
		return CUDA_ERROR_NOT_INITIALIZED;
	if (c != NULL && (c < ctxs || c >= ctxs + MAX_CTX || !c->used))
		return CUDA_ERROR_INVALID_CONTEXT;
	cur = c;
	return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetDevice(CUdevice *d)
{
	if (!inited)
		return CUDA_ERROR_NOT_INITIALIZED;
	if (d == NULL)
		return CUDA_ERROR_INVALID_VALUE;
	if (cur == NULL)
		return CUDA_ERROR_INVALID_CONTEXT;
	*d = cur->dev;
	return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSynchronize(void)
{
	CUresult r = enter();
	if (r != CUDA_SUCCESS)
		return r;
	return leave(drain());
}

EXPORT CUresult cuCtxDestroy_v2(CUcontext c)
{
	CUresult r = enter();
	if (r != CUDA_SUCCESS)
		return r;
	if (c == NULL || c < ctxs || c >= ctxs + MAX_CTX || !c->used)
		return leave(CUDA_ERROR_INVALID_CONTEXT);
	drain();
	char p[PATH_MAX + 128];
	memfile_path(c, p, sizeof(p));
	unlink(p);
	pthread_mutex_lock(&mu);
	c->used = 0;
	pthread_mutex_unlock(&mu);
	if (cur == c)
		cur = NULL;
	return leave(CUDA_SUCCESS);
}

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n)
{
	if (p == NULL || n == 0)
		return CUDA_ERROR_INVALID_VALUE;
	CUresult r = enter();
	if (r != CUDA_SUCCESS)
		return r;
	struct fc_ctx *c = cur;
	if (c == NULL || !c->used)
		return leave(CUDA_ERROR_INVALID_CONTEXT);
	if (!fg_same_start(c->start, self_start()))
		return leave(CUDA_ERROR_DEVICE_UNAVAILABLE);
	size_t rounded = (n + 255) & ~(size_t)255;
	struct fg_world now; /* the GPUs of today: the context may have moved */
	int gi = fg_load(&now) == 0 ? fg_find_uuid(&now, c->uuid) : -1;
	if (gi < 0)
		return leave(CUDA_ERROR_DEVICE_UNAVAILABLE);
	if (fg_scan(&now, gi, NULL, NULL) + rounded > now.g[gi].total)
		return leave(CUDA_ERROR_OUT_OF_MEMORY);
	char path[PATH_MAX + 128];
	memfile_path(c, path, sizeof(path));
	if (truncate(path, (off_t)(c->size + rounded)) != 0)
		return leave(CUDA_ERROR_DEVICE_UNAVAILABLE);
	*p = ctx_base(c) + c->size;
	c->size += rounded;
	return leave(CUDA_SUCCESS);
}

EXPORT CUresult cuMemFree_v2(CUdeviceptr p)
{
	CUresult r = enter();
	if (r != CUDA_SUCCESS)
		return r;
	unsigned long long off;
	return leave(ctx_of(p, 1, &off) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE);
}

EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n)
{
	CUresult r = enter();
	if (r != CUDA_SUCCESS)
		return r;
	unsigned long long off;
	struct fc_ctx *c = ctx_of(dst, n, &off);
	if (c == NULL || src == NULL)
		return leave(CUDA_ERROR_INVALID_VALUE);
	if ((r = drain()) != CUDA_SUCCESS)
		return leave(r);
	return leave(dev_io(c, 1, off, (void *)src, n));
}

EXPORT CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n)
{
	CUresult r = enter();
	if (r != CUDA_SUCCESS)
		return r;
	unsigned long long off;
	struct fc_ctx *c = ctx_of(src, n, &off);
	if (c == NULL || dst == NULL)
		return leave(CUDA_ERROR_INVALID_VALUE);
	if ((r = drain()) != CUDA_SUCCESS)
		return leave(r);
	return leave(dev_io(c, 0, off, dst, n));
}

/* fakeLaunchKernel queues kernel number `kernel` (1 = mix) over n bytes at p
 * and returns at once; kernels run in launch order on the fake GPU. */
EXPORT CUresult fakeLaunchKernel(int kernel, CUdeviceptr p, size_t n, unsigned long long arg)
{
	CUresult r = enter();
	if (r != CUDA_SUCCESS)
		return r;
	unsigned long long off;
	struct fc_ctx *c = ctx_of(p, n, &off);
	if (c == NULL || n % 8 != 0 || kernel != 1)
		return leave(CUDA_ERROR_INVALID_VALUE);
	pthread_mutex_lock(&mu);
	while (qtail - qhead >= QLEN)
		pthread_cond_wait(&cv, &mu);
	q[qtail % QLEN] = (struct fc_work){ c, p, n, arg, kernel };
	qtail++;
	pthread_cond_broadcast(&cv);
	r = async_err;
	pthread_mutex_unlock(&mu);
	return leave(r);
}

/* -------------------------------------------- checkpoint API (controller) */

/* find_driver_thread returns the tid of pid's driver thread, 0 if none. */
static int find_driver_thread(int pid)
{
	char dir[64];
	snprintf(dir, sizeof(dir), "/proc/%d/task", pid);
	DIR *d = opendir(dir);
	if (d == NULL)
		return 0;
	int tid = 0;
	struct dirent *e;
	while (tid == 0 && (e = readdir(d)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		char p[128], comm[64] = { 0 };
		snprintf(p, sizeof(p), "%s/%s/comm", dir, e->d_name);
		int fd = open(p, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		ssize_t n = read(fd, comm, sizeof(comm) - 1);
		close(fd);
		if (n > 0 && strncmp(comm, DRV_NAME "\n", sizeof(DRV_NAME)) == 0)
			tid = atoi(e->d_name);
	}
	closedir(d);
	return tid;
}

static unsigned long long next_seq(void)
{
	static unsigned long long counter;
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return ((unsigned long long)getpid() << 40) ^ ((unsigned long long)ts.tv_nsec << 8) ^ __atomic_add_fetch(&counter, 1, __ATOMIC_SEQ_CST);
}

/* request sends one request to pid's driver thread and waits for the answer.
 * A target that stays stopped (SIGSTOP) for a second cannot answer: that is
 * CUDA_ERROR_NOT_READY rather than a hang. */
static CUresult request(int pid, char op, unsigned int timeout_ms, int npairs, char (*olds)[64], char (*news)[64], int *state)
{
	if (!inited)
		return CUDA_ERROR_NOT_INITIALIZED;
	if (pid <= 0)
		return CUDA_ERROR_INVALID_VALUE;
	int tid = find_driver_thread(pid);
	if (tid == 0)
		return CUDA_ERROR_NOT_FOUND; /* not a CUDA process */
	/* The target's name, which its driver thread serves under: the PID we
	 * were given is the one we see, on the node, and the target may be in
	 * a PID namespace of its own, where it has another. */
	struct fg_name target;
	if (fg_name_of(pid, &target) != 0)
		return CUDA_ERROR_NOT_FOUND; /* gone, or not ours to inspect */
	char dir[PATH_MAX], p[PATH_MAX + 16], resp[PATH_MAX + 16], name[64];
	fg_name_format(&target, name, sizeof(name));
	mailbox_dir(name, dir, sizeof(dir));
	fg_mkdirs(dir);
	snprintf(p, sizeof(p), "%s/lock", dir);
	int lk = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (lk < 0 || flock(lk, LOCK_EX) != 0) {
		if (lk >= 0)
			close(lk);
		return CUDA_ERROR_OPERATING_SYSTEM;
	}
	unsigned long long seq = next_seq();
	char text[64 + FG_MAX_GPUS * 140];
	int off = snprintf(text, sizeof(text), "%llu %c %u %d", seq, op, timeout_ms, npairs);
	for (int i = 0; i < npairs; i++)
		off += snprintf(text + off, sizeof(text) - (size_t)off, " %s %s", olds[i], news[i]);
	snprintf(text + off, sizeof(text) - (size_t)off, "\n");
	snprintf(p, sizeof(p), "%s/req", dir);
	snprintf(resp, sizeof(resp), "%s/resp", dir);
	CUresult r = CUDA_ERROR_OPERATING_SYSTEM;
	if (fg_write_atomic(p, text) != 0)
		goto out;

	long long begin = fg_now_ms(), last_wake = 0, last_check = begin, stopped_since = 0;
	long long limit = (op == 'L' && timeout_ms > 0 ? (long long)timeout_ms : 0) + 120000;
	syscall(SYS_tgkill, pid, tid, WAKE_SIG);
	last_wake = begin;
	for (;;) {
		FILE *f = fopen(resp, "re");
		if (f != NULL) {
			unsigned long long got;
			int res, st;
			int n = fscanf(f, "%llu %d %d", &got, &res, &st);
			fclose(f);
			if (n == 3 && got == seq) {
				unlink(resp);
				if (state != NULL)
					*state = st;
				r = res;
				goto out;
			}
		}
		long long now = fg_now_ms();
		if (now - last_check >= 100) {
			last_check = now;
			if (find_driver_thread(pid) != tid) {
				r = CUDA_ERROR_NOT_FOUND; /* the process is gone */
				break;
			}
			char s = fg_proc_state(pid);
			if (s == 'T' || s == 't') {
				if (stopped_since == 0)
					stopped_since = now;
				else if (now - stopped_since > 1000) {
					r = CUDA_ERROR_NOT_READY;
					break;
				}
			} else {
				stopped_since = 0;
			}
		}
		if (now - begin > limit) {
			r = CUDA_ERROR_TIMEOUT;
			break;
		}
		if (now - last_wake >= 200) {
			syscall(SYS_tgkill, pid, tid, WAKE_SIG);
			last_wake = now;
		}
		fg_sleep_ms(1);
	}
	unlink(p); /* withdraw a request that was not taken */
out:
	close(lk);
	return r;
}

static int api_supported(void) { return W.cuda_version >= 12080; }

static int all_zero(const void *p, size_t n)
{
	const unsigned char *b = p;
	for (size_t i = 0; i < n; i++)
		if (b[i] != 0)
			return 0;
	return 1;
}

EXPORT CUresult cuCheckpointProcessGetState(int pid, int *state)
{
	if (!inited)
		return CUDA_ERROR_NOT_INITIALIZED;
	if (!api_supported())
		return CUDA_ERROR_NOT_SUPPORTED;
	if (state == NULL)
		return CUDA_ERROR_INVALID_VALUE;
	return request(pid, 'S', 0, 0, NULL, NULL, state);
}

EXPORT CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid)
{
	if (!inited)
		return CUDA_ERROR_NOT_INITIALIZED;
	if (!api_supported())
		return CUDA_ERROR_NOT_SUPPORTED;
	if (tid == NULL || pid <= 0)
		return CUDA_ERROR_INVALID_VALUE;
	int t = find_driver_thread(pid);
	if (t == 0)
		return CUDA_ERROR_NOT_FOUND;
	*tid = t;
	return CUDA_SUCCESS;
}

EXPORT CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args)
{
	if (!inited)
		return CUDA_ERROR_NOT_INITIALIZED;
	if (!api_supported())
		return CUDA_ERROR_NOT_SUPPORTED;
	unsigned int timeout = 0;
	if (args != NULL) {
		if (args->reserved0 != 0 || !all_zero(args->reserved1, sizeof(args->reserved1)))
			return CUDA_ERROR_INVALID_VALUE;
		timeout = args->timeoutMs;
	}
	return request(pid, 'L', timeout, 0, NULL, NULL, NULL);
}

EXPORT CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args)
{
	if (!inited)
		return CUDA_ERROR_NOT_INITIALIZED;
	if (!api_supported())
		return CUDA_ERROR_NOT_SUPPORTED;
	if (args != NULL && !all_zero(args, sizeof(*args)))
		return CUDA_ERROR_INVALID_VALUE;
	return request(pid, 'C', 0, 0, NULL, NULL, NULL);
}

EXPORT CUresult cuCheckpointProcessRestore(int pid, void *args)
{
	if (!inited)
		return CUDA_ERROR_NOT_INITIALIZED;
	if (!api_supported())
		return CUDA_ERROR_NOT_SUPPORTED;
	char olds[FG_MAX_GPUS][64], news[FG_MAX_GPUS][64];
	int n = 0;
	if (args != NULL) {
		unsigned char raw[64];
		memcpy(raw, args, sizeof(raw));
		if (W.cuda_version < 13000) {
			if (!all_zero(raw, sizeof(raw)))
				return CUDA_ERROR_INVALID_VALUE; /* no GPU pairs before CUDA 13.0 */
		} else {
			CUcheckpointRestoreArgs13 a;
			memcpy(&a, raw, sizeof(a));
			if (!all_zero(raw + 12, sizeof(raw) - 12))
				return CUDA_ERROR_INVALID_VALUE;
			if (a.gpuPairsCount > FG_MAX_GPUS || (a.gpuPairsCount > 0) != (a.gpuPairs != NULL))
				return CUDA_ERROR_INVALID_VALUE;
			for (unsigned int i = 0; i < a.gpuPairsCount; i++) {
				fg_format_uuid((const unsigned char *)a.gpuPairs[i].oldUuid.bytes, olds[i]);
				fg_format_uuid((const unsigned char *)a.gpuPairs[i].newUuid.bytes, news[i]);
			}
			n = (int)a.gpuPairsCount;
		}
	}
	/* The real driver frees a process's device memory when it dies. The
	 * fake reclaims it when a scanner can tell its owner is gone, which a
	 * restored process in a new PID namespace cannot for its former self
	 * (in a namespace it does not see): the caller, on the node, sweeps. */
	struct fg_world now;
	if (fg_load(&now) == 0)
		for (int gi = 0; gi < now.n; gi++)
			fg_scan(&now, gi, NULL, NULL);
	return request(pid, 'R', 0, n, olds, news, NULL);
}

EXPORT CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args)
{
	if (!inited)
		return CUDA_ERROR_NOT_INITIALIZED;
	if (!api_supported())
		return CUDA_ERROR_NOT_SUPPORTED;
	if (args != NULL && !all_zero(args, sizeof(*args)))
		return CUDA_ERROR_INVALID_VALUE;
	return request(pid, 'U', 0, 0, NULL, NULL, NULL);
}
