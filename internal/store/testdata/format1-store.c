/*
 * The process in testdata/format1-store: no libc, no open file, 64 KiB of
 * memory holding a known pattern (text, then xorshift bytes), asleep.
 *
 * The store was made once, as root, with the cryo of commit 829f7f2 (the
 * last before pack files; built in a git worktree with commit e1e844e's
 * page-server fix added so that it speaks to CRIU 4.2.1, nothing else):
 *
 *   gcc -O1 -static -nostdlib -fno-stack-protector -no-pie -o cryofixture format1-store.c
 *   unshare -m -C --propagation private sh -c '
 *     setsid -f ./cryofixture </dev/null >/dev/null 2>&1; sleep 0.5
 *     CRYO_CRIU=/usr/local/lib/cryo/criu/sbin/criu \
 *       oldcryo checkpoint --store STORE --kill $(pgrep -x cryofixture)'
 *
 * (private mount and cgroup namespaces keep the machine's own mounts and
 * cgroup paths out of CRIU's log, which the generation holds). The store's
 * cryo-store.json, checkpoints/ and chunks/ were copied here as they were.
 */
#define PATTERN_BYTES (64 * 1024)

/* Not static: the compiler must keep the stores. */
volatile unsigned char pattern[PATTERN_BYTES];

static long sys3(long n, long a, long b, long c) {
	long r;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return r;
}

void _start(void) {
	for (int fd = 0; fd < 1024; fd++)
		sys3(3, fd, 0, 0); /* close */
	/* "cryo format-1 fixture " for the first half, xorshift bytes after. */
	const char tag[] = "cryo format-1 fixture ";
	unsigned x = 2463534242u;
	for (int i = 0; i < PATTERN_BYTES; i++) {
		if (i < PATTERN_BYTES / 2) {
			pattern[i] = tag[i % (sizeof tag - 1)];
		} else {
			x ^= x << 13; x ^= x >> 17; x ^= x << 5;
			pattern[i] = (unsigned char)x;
		}
	}
	for (;;)
		sys3(34, 0, 0, 0); /* pause */
}
