/*
 * fakegpu.h: the fake "hardware" shared by the fake libcuda.so.1
 * (fakecuda.c) and the fake libnvidia-ml.so.1 (fakenvml.c).
 *
 * Everything lives under $FAKECUDA_ROOT:
 *
 *   gpus                  one GPU per line: "UUID MEMORY_MIB MODEL..." (index = line order)
 *   driver                optional: "CUDA_VERSION DRIVER_VERSION", e.g. "13000 580.65.06"
 *   inject                optional: "key=value" lines read at each request (see fakecuda.c)
 *   mem/<UUID>/<name>.<start>.<ctx>
 *                         device memory of one context: the bytes of its allocations.
 *                         It is owned by the process (name, start time); once that
 *                         process is gone the file is reclaimed, as the real driver
 *                         frees a dead process's contexts.
 *   proc/<name>/          mailbox between a controller and the target's driver thread
 *   xid                   optional: "UUID XID" lines, delivered as NVML Xid events
 *
 * A process is named "<ns>-<pid>": the inode of its PID namespace
 * (/proc/<pid>/ns/pid reads "pid:[<ns>]") and its PID in that namespace (the
 * last NSpid of /proc/<pid>/status). A process in a PID namespace of its own
 * (a job under cryo run) has one PID inside and another on the node; this
 * name is the same from both sides: the process computes it from getpid(),
 * a controller on the node from the PID it sees (fg_name_of), and a scanner
 * turns it back into the PID it sees (fg_resolve). As the real driver does,
 * every API takes and reports PIDs as its caller sees them.
 *
 * Device memory is never in a process's address space: it is reachable only
 * through the fake API, so a CRIU image of a process that was not CUDA-
 * checkpointed does not contain it.
 */
#ifndef FAKEGPU_H
#define FAKEGPU_H

#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define FG_MAX_GPUS 16

struct fg_gpu {
	char uuid[64];          /* "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" */
	unsigned char raw[16];  /* the same, as CUuuid bytes */
	char model[96];
	unsigned long long total; /* bytes */
};

struct fg_world {
	char root[PATH_MAX];
	int n;
	struct fg_gpu g[FG_MAX_GPUS];
	int cuda_version;       /* as cuDriverGetVersion: 1000*major + 10*minor */
	char driver_version[32];
};

static __attribute__((unused)) int fg_hex(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c = tolower(c);
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/* fg_parse_uuid turns "GPU-8f40...-..." into 16 bytes; 0 on success. */
static __attribute__((unused)) int fg_parse_uuid(const char *s, unsigned char out[16])
{
	if (strncmp(s, "GPU-", 4) == 0)
		s += 4;
	int n = 0;
	for (; *s && n < 32; s++) {
		if (*s == '-')
			continue;
		int v = fg_hex(*s);
		if (v < 0)
			return -1;
		if (n % 2 == 0)
			out[n / 2] = (unsigned char)(v << 4);
		else
			out[n / 2] |= (unsigned char)v;
		n++;
	}
	return (n == 32 && *s == 0) ? 0 : -1;
}

static __attribute__((unused)) void fg_format_uuid(const unsigned char b[16], char out[64])
{
	snprintf(out, 64, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
		 b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

/* fg_load reads the world's configuration. It returns 0, or -1 when there
 * is no root or no GPU (the caller reports "no device"). */
static __attribute__((unused)) int fg_load(struct fg_world *w)
{
	memset(w, 0, sizeof(*w));
	const char *root = getenv("FAKECUDA_ROOT");
	if (root == NULL || *root == 0)
		return -1;
	snprintf(w->root, sizeof(w->root), "%s", root);
	w->cuda_version = 13000;
	snprintf(w->driver_version, sizeof(w->driver_version), "580.65.06");

	char p[PATH_MAX + 16];
	snprintf(p, sizeof(p), "%s/driver", w->root);
	FILE *f = fopen(p, "r");
	if (f != NULL) {
		int v;
		char dv[32];
		if (fscanf(f, "%d %31s", &v, dv) == 2) {
			w->cuda_version = v;
			snprintf(w->driver_version, sizeof(w->driver_version), "%s", dv);
		}
		fclose(f);
	}

	snprintf(p, sizeof(p), "%s/gpus", w->root);
	f = fopen(p, "r");
	if (f == NULL)
		return -1;
	char line[512];
	while (w->n < FG_MAX_GPUS && fgets(line, sizeof(line), f) != NULL) {
		char uuid[64], model[96];
		unsigned long long mib;
		int used = 0;
		if (line[0] == '#' || sscanf(line, "%63s %llu %n", uuid, &mib, &used) < 2 || used == 0)
			continue;
		snprintf(model, sizeof(model), "%s", line + used);
		model[strcspn(model, "\r\n")] = 0;
		struct fg_gpu *g = &w->g[w->n];
		if (fg_parse_uuid(uuid, g->raw) != 0)
			continue;
		fg_format_uuid(g->raw, g->uuid);
		snprintf(g->model, sizeof(g->model), "%s", model);
		g->total = mib << 20;
		w->n++;
	}
	fclose(f);
	return w->n > 0 ? 0 : -1;
}

static __attribute__((unused)) int fg_find_uuid(const struct fg_world *w, const char *uuid)
{
	for (int i = 0; i < w->n; i++)
		if (strcasecmp(w->g[i].uuid, uuid) == 0)
			return i;
	return -1;
}

/* fg_boot_offset_ticks is the boottime offset of the caller's time
 * namespace, in clock ticks. CRIU restores a process into a time namespace
 * whose clocks continue from the dump; seen from inside it, every process's
 * start time is shifted by this offset. */
static __attribute__((unused)) long long fg_boot_offset_ticks(void)
{
	FILE *f = fopen("/proc/self/timens_offsets", "re");
	if (f == NULL)
		return 0;
	char name[32];
	long long sec, nsec, ticks = 0;
	while (fscanf(f, "%31s %lld %lld", name, &sec, &nsec) == 3) {
		if (strcmp(name, "boottime") != 0)
			continue;
		long long ns = sec * 1000000000LL + nsec;
		long long per = 1000000000LL / sysconf(_SC_CLK_TCK);
		ticks = ns >= 0 ? ns / per : -((-ns + per - 1) / per);
	}
	fclose(f);
	return ticks;
}

/* fg_proc_start returns a process's start time (field 22 of stat) on the
 * root namespace's clock, 0 if there is no such process. With the pid it
 * names a process uniquely; a process that CRIU restored has the same pid
 * but a new start time. Seen through a time namespace it may be off by
 * one tick: compare with fg_same_start. pid 0 is the caller. */
static __attribute__((unused)) unsigned long long fg_proc_start(int pid)
{
	char p[64], buf[1024];
	if (pid == 0)
		snprintf(p, sizeof(p), "/proc/self/stat"); /* whatever namespace /proc is of */
	else
		snprintf(p, sizeof(p), "/proc/%d/stat", pid);
	int fd = open(p, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	char *s = strrchr(buf, ')');
	if (s == NULL)
		return 0;
	s += 2; /* field 3 */
	if (*s == 'Z' || *s == 'X')
		return 0;
	for (int field = 3; field < 22 && *s; s++)
		if (*s == ' ')
			field++;
	long long v = (long long)strtoull(s, NULL, 10) - fg_boot_offset_ticks();
	return v > 0 ? (unsigned long long)v : 1;
}

/* fg_same_start compares start times from fg_proc_start. */
static __attribute__((unused)) int fg_same_start(unsigned long long a, unsigned long long b)
{
	return a != 0 && b != 0 && (a == b || a == b + 1 || a + 1 == b);
}

/* fg_proc_state returns the state letter of a process ('R', 'S', 'T', ...),
 * or 0 if it does not exist. */
static __attribute__((unused)) char fg_proc_state(int pid)
{
	char p[64], buf[512];
	snprintf(p, sizeof(p), "/proc/%d/stat", pid);
	int fd = open(p, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	char *s = strrchr(buf, ')');
	return (s != NULL && s[1] == ' ') ? s[2] : 0;
}

/* fg_name is how the fake names a process across PID namespaces. */
struct fg_name {
	unsigned long long ns; /* inode of its PID namespace */
	int pid;               /* its PID there */
};

/* fg_ns_inode reads the PID namespace inode of pid (0: the caller); 0 when
 * it cannot be read (no such process, or not ours to inspect). */
static __attribute__((unused)) unsigned long long fg_ns_inode(int pid)
{
	char p[64], link[64];
	if (pid == 0)
		snprintf(p, sizeof(p), "/proc/self/ns/pid");
	else
		snprintf(p, sizeof(p), "/proc/%d/ns/pid", pid);
	ssize_t n = readlink(p, link, sizeof(link) - 1);
	if (n <= 0)
		return 0;
	link[n] = 0;
	unsigned long long ino;
	return sscanf(link, "pid:[%llu]", &ino) == 1 ? ino : 0;
}

/* fg_inner_pid is pid's PID in its own PID namespace: the last field of the
 * NSpid line of its status (pid itself on kernels without one); 0 if it
 * cannot be read. */
static __attribute__((unused)) int fg_inner_pid(int pid)
{
	char p[64], buf[4096];
	snprintf(p, sizeof(p), "/proc/%d/status", pid);
	int fd = open(p, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	char *l = strstr(buf, "\nNSpid:");
	if (l == NULL)
		return pid;
	l += strlen("\nNSpid:");
	int last = 0;
	for (;;) {
		while (*l == ' ' || *l == '\t')
			l++;
		if (!isdigit((unsigned char)*l))
			break;
		last = (int)strtol(l, &l, 10);
	}
	return last;
}

/* fg_name_of names pid as seen by the caller (0: the caller itself);
 * 0 on success, -1 when the process cannot be inspected. */
static __attribute__((unused)) int fg_name_of(int pid, struct fg_name *out)
{
	out->ns = fg_ns_inode(pid);
	out->pid = pid == 0 ? (int)getpid() : fg_inner_pid(pid);
	return out->ns != 0 && out->pid > 0 ? 0 : -1;
}

/* fg_name_format writes "<ns>-<pid>". */
static __attribute__((unused)) void fg_name_format(const struct fg_name *n, char *out, size_t len)
{
	snprintf(out, len, "%llu-%d", n->ns, n->pid);
}

/* The initial PID namespace's inode (PROC_PID_INIT_INO of the kernel): a
 * process there sees every process of the node. */
#define FG_INIT_PID_NS 0xEFFFFFFCULL

enum { FG_SEEN = 0, FG_GONE = 1, FG_UNSEEN = 2 };

/* fg_resolve finds the process named n that started at start (as
 * fg_proc_start gives it), as the caller sees it. FG_SEEN: it is *pid.
 * FG_GONE: it is no more, as the caller can tell: n's namespace is one it
 * sees (its own, or one it sees processes of) and the process is not in it,
 * or the caller sees every process of the node (it is in the initial PID
 * namespace) and none could be that one. FG_UNSEEN: the caller cannot
 * tell, as a process in a job's PID namespace cannot see those outside. */
static __attribute__((unused)) int fg_resolve(const struct fg_name *n, unsigned long long start, int *pid)
{
	unsigned long long own = fg_ns_inode(0);
	if (own != 0 && n->ns == own && fg_ns_inode(n->pid) == own && fg_inner_pid(n->pid) == n->pid) {
		/* Our own namespace, and /proc is of it: its PIDs are ours. */
		*pid = n->pid;
		return fg_same_start(fg_proc_start(n->pid), start) ? FG_SEEN : FG_GONE;
	}
	DIR *d = opendir("/proc");
	if (d == NULL)
		return FG_UNSEEN;
	int members = 0, maybe = 0, how = -1;
	struct dirent *e;
	while (how < 0 && (e = readdir(d)) != NULL) {
		if (!isdigit((unsigned char)e->d_name[0]))
			continue;
		int x = atoi(e->d_name);
		unsigned long long ns = fg_ns_inode(x);
		if (ns == 0) {
			/* Not ours to inspect (or just gone): it could be the one
			 * only if it started when that one did. */
			maybe += fg_same_start(fg_proc_start(x), start);
			continue;
		}
		if (ns != n->ns)
			continue;
		members++;
		if (fg_inner_pid(x) == n->pid) {
			*pid = x;
			/* The name is taken by another process: the one is gone. */
			how = fg_same_start(fg_proc_start(x), start) ? FG_SEEN : FG_GONE;
		}
	}
	closedir(d);
	if (how >= 0)
		return how;
	if (members > 0 || (own == FG_INIT_PID_NS && maybe == 0))
		return FG_GONE;
	return FG_UNSEEN;
}

static __attribute__((unused)) void fg_mkdirs(const char *path)
{
	char tmp[PATH_MAX];
	snprintf(tmp, sizeof(tmp), "%s", path);
	for (char *p = tmp + 1; *p; p++) {
		if (*p == '/') {
			*p = 0;
			mkdir(tmp, 0755);
			*p = '/';
		}
	}
	mkdir(tmp, 0755);
}

static __attribute__((unused)) void fg_mem_dir(const struct fg_world *w, const char *uuid, char *out, size_t len)
{
	snprintf(out, len, "%s/mem/%s", w->root, uuid);
}

/* fg_memfile_owner parses "<ns>-<pid>.<start>.<ctx>". */
static __attribute__((unused)) int fg_memfile_owner(const char *name, struct fg_name *owner, unsigned long long *start)
{
	return sscanf(name, "%llu-%d.%llu.", &owner->ns, &owner->pid, start) == 3 && owner->pid > 0 ? 0 : -1;
}

/* fg_usage is the callback of fg_scan for one live context's memory; pid
 * is its owner as the caller sees it. */
typedef void (*fg_usage_fn)(void *arg, int pid, unsigned long long bytes);

/* fg_scan walks the device memory of GPU gi: it reclaims memory whose
 * owner is gone, reports each live context whose owner the caller sees
 * through fn (may be NULL) and returns the bytes in use, those of owners
 * it cannot see included. */
static __attribute__((unused)) unsigned long long fg_scan(const struct fg_world *w, int gi, fg_usage_fn fn, void *arg)
{
	char dir[PATH_MAX];
	fg_mem_dir(w, w->g[gi].uuid, dir, sizeof(dir));
	DIR *d = opendir(dir);
	if (d == NULL)
		return 0;
	unsigned long long used = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		struct fg_name owner;
		unsigned long long start;
		if (e->d_name[0] == '.' || fg_memfile_owner(e->d_name, &owner, &start) != 0)
			continue;
		char p[PATH_MAX + 300];
		snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
		int pid = 0, how = fg_resolve(&owner, start, &pid);
		if (how == FG_GONE) {
			unlink(p); /* the owner died: the driver frees its memory */
			continue;
		}
		struct stat st;
		if (stat(p, &st) != 0)
			continue;
		used += (unsigned long long)st.st_size;
		if (fn != NULL && how == FG_SEEN)
			fn(arg, pid, (unsigned long long)st.st_size);
	}
	closedir(d);
	return used;
}

/* fg_inject reads one "key=value" of $FAKECUDA_ROOT/inject; def if unset. */
static __attribute__((unused)) long long fg_inject(const struct fg_world *w, const char *key, long long def)
{
	char p[PATH_MAX + 16], line[256];
	snprintf(p, sizeof(p), "%s/inject", w->root);
	FILE *f = fopen(p, "r");
	if (f == NULL)
		return def;
	size_t kl = strlen(key);
	long long v = def;
	while (fgets(line, sizeof(line), f) != NULL) {
		if (strncmp(line, key, kl) == 0 && line[kl] == '=') {
			v = strtoll(line + kl + 1, NULL, 10);
			break;
		}
	}
	fclose(f);
	return v;
}

static __attribute__((unused)) void fg_sleep_ms(long long ms)
{
	if (ms <= 0)
		return;
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static __attribute__((unused)) long long fg_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* fg_write_atomic writes a small file through a temporary and a rename. */
static __attribute__((unused)) int fg_write_atomic(const char *path, const char *text)
{
	char tmp[PATH_MAX + 32];
	snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid());
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -1;
	size_t n = strlen(text);
	if (write(fd, text, n) != (ssize_t)n) {
		close(fd);
		unlink(tmp);
		return -1;
	}
	close(fd);
	return rename(tmp, path);
}

#endif
