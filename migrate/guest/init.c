/*
 * /init of the migration tests' guest: a memory checker that never exits.
 *
 * It holds an 8 MiB hot set and a 24 MiB cold set. Every page's content is derived from its
 * index (and, for hot pages, the round number), so any page can be checked on its own. Each
 * round (one per ROUND_NS at most) checks every hot page against the previous round's value and
 * rewrites it with this round's; every COLD_EVERY rounds every cold page is checked. A page
 * with any wrong word counts once as bad, and the count is cumulative. It prints
 * "rmem-guest ready" once both sets are filled, then "tick N bad=M" (N the round, M the bad
 * pages so far) every TICK_EVERY rounds, on ttyS0. A third, fresh set is touched for the first
 * time while the program runs, one page every FRESH_NS by a thread of its own, and checked with
 * the cold set: in a guest those pages come from RAM the guest never used (holes in its RAM
 * file), so a migration that skips holes it saw before the pause loses some of them. A cold
 * page's first word is
 * seed_of(index, 0, 1), so a test can find cold pages in the guest's RAM file by their content
 * (migrate/tests/support/guest.rs mirrors seed_of).
 *
 * With "rmem.heartbeat" on the kernel command line a second thread writes one byte to ttyS1
 * every 10 ms, for measuring how long the guest stops during a migration. "rmem.cold=N" makes
 * the cold set N MiB instead of 24 (a big guest whose RAM is mostly data, for benchmarks).
 *
 * If /init exits the kernel panics, so every failure here is reported and then waited out.
 *
 * Built with gcc -O2 -static by build.sh. The same program built dynamically ("writer") runs
 * as a process with "--file PATH": both sets live in PATH, mapped shared (a tmpfs file an rmem
 * agent moves, with rmem's preload library loaded), and its lines go to stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / sizeof(uint64_t))
#define HOT_PAGES ((8u << 20) / PAGE)
#define COLD_PAGES ((24u << 20) / PAGE)
/* Small enough to fit beside the others in a 128 MiB guest without swap. */
#define FRESH_PAGES ((8u << 20) / PAGE)
#define FRESH_NS 4000000L /* 4 ms: the fresh set lasts 8.4 s */
#define ROUND_NS 100000000L /* 100 ms */
#define COLD_EVERY 10
#define TICK_EVERY 3

static int out = -1;

/* Writes a line to the console; a console that cannot be written is left alone. */
static void say(const char *fmt, ...)
{
	char buf[160];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0 || out < 0)
		return;
	if ((size_t)n >= sizeof buf)
		n = sizeof buf - 1;
	const char *p = buf;
	while (n > 0) {
		ssize_t w = write(out, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		p += w;
		n -= w;
	}
}

/* Never returns: /init must not exit. */
static void hang(void)
{
	for (;;)
		pause();
}

/* Opens /dev/NAME (char major 4, minor MINOR), creating the node if devtmpfs did not. */
static int open_tty(const char *name, unsigned minor)
{
	char path[32];
	snprintf(path, sizeof path, "/dev/%s", name);
	int fd = open(path, O_WRONLY | O_NOCTTY);
	if (fd < 0 && errno == ENOENT && mknod(path, S_IFCHR | 0600, makedev(4, minor)) == 0)
		fd = open(path, O_WRONLY | O_NOCTTY);
	return fd;
}

static uint64_t splitmix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

/* The first word of a page's pattern; never zero, so a zeroed page is always wrong. */
static uint64_t seed_of(uint64_t page, uint64_t round, uint64_t set)
{
	uint64_t s = splitmix(page ^ (round << 24) ^ (set << 62));
	return s ? s : 1;
}

static inline uint64_t xorshift(uint64_t x)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

static void fill(uint64_t *p, uint64_t seed)
{
	uint64_t x = seed;
	for (unsigned i = 0; i < WORDS; i++) {
		p[i] = x;
		x = xorshift(x);
	}
}

/* 1 when the page does not hold the pattern of `seed`. */
static int wrong(const uint64_t *p, uint64_t seed)
{
	uint64_t x = seed, diff = 0;
	for (unsigned i = 0; i < WORDS; i++) {
		diff |= p[i] ^ x;
		x = xorshift(x);
	}
	return diff != 0;
}

static void *heartbeat(void *arg)
{
	int fd = *(int *)arg;
	struct timespec next;
	clock_gettime(CLOCK_MONOTONIC, &next);
	for (;;) {
		(void)!write(fd, ".", 1);
		next.tv_nsec += 10000000L;
		if (next.tv_nsec >= 1000000000L) {
			next.tv_nsec -= 1000000000L;
			next.tv_sec++;
		}
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
			;
	}
	return NULL;
}

/* Pages of the fresh set touched so far. */
static uint64_t fresh_touched;

static void *freshen(void *arg)
{
	uint64_t *fresh = arg;
	struct timespec t = {0, FRESH_NS};
	for (uint64_t i = 0; i < FRESH_PAGES; i++) {
		fill(fresh + i * WORDS, seed_of(i, 0, 2));
		__atomic_store_n(&fresh_touched, i + 1, __ATOMIC_RELEASE);
		while (nanosleep(&t, &t) == EINTR)
			;
		t.tv_nsec = FRESH_NS;
	}
	return NULL;
}

/* The kernel command line ("" when it cannot be read). */
static const char *cmdline(void)
{
	static char line[1024];
	int c = open("/proc/cmdline", O_RDONLY);
	if (c >= 0) {
		ssize_t n = read(c, line, sizeof line - 1);
		line[n > 0 ? n : 0] = 0;
		close(c);
	}
	return line;
}

/* Starts the heartbeat thread when the kernel command line asks for it. */
static void start_heartbeat(void)
{
	static int fd;
	if (!strstr(cmdline(), "rmem.heartbeat"))
		return;
	fd = open_tty("ttyS1", 65);
	pthread_t t;
	if (fd < 0)
		say("rmem-guest: no heartbeat: ttyS1: %s\n", strerror(errno));
	else if ((errno = pthread_create(&t, NULL, heartbeat, &fd)) != 0)
		say("rmem-guest: no heartbeat: %s\n", strerror(errno));
}

/*
 * Anonymous memory in 4 KiB pages: no transparent huge page, so khugepaged never copies a page
 * elsewhere and each page keeps one place in guest RAM (a test may find it there by its
 * content). fill() touches every page.
 */
static void *alloc(size_t pages)
{
	void *p = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		       -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	madvise(p, pages * PAGE, MADV_NOHUGEPAGE);
	return p;
}

/* The three sets in one shared mapping of PATH (created at their size: the fresh set a hole). */
static uint64_t *map_file(const char *path)
{
	size_t len = (size_t)(HOT_PAGES + COLD_PAGES + FRESH_PAGES) * PAGE;
	int fd = open(path, O_RDWR | O_CREAT, 0600);
	if (fd < 0 || ftruncate(fd, (off_t)len) != 0)
		return NULL;
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	return p == MAP_FAILED ? NULL : p;
}

int main(int argc, char **argv)
{
	uint64_t *hot, *cold, *fresh;
	uint64_t cold_pages = COLD_PAGES;
	if (argc == 3 && strcmp(argv[1], "--file") == 0) {
		out = 1;
		hot = map_file(argv[2]);
		if (!hot) {
			say("rmem-writer: %s: %s\n", argv[2], strerror(errno));
			return 1;
		}
		cold = hot + (size_t)HOT_PAGES * WORDS;
		fresh = cold + (size_t)COLD_PAGES * WORDS;
	} else {
		mkdir("/dev", 0755);
		mkdir("/proc", 0555);
		mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
		mount("proc", "/proc", "proc", 0, NULL);
		out = open_tty("ttyS0", 64);
		if (out < 0)
			out = open("/dev/console", O_WRONLY | O_NOCTTY);
		const char *mib = strstr(cmdline(), "rmem.cold=");
		if (mib && strtoull(mib + 10, NULL, 10) > 0)
			cold_pages = strtoull(mib + 10, NULL, 10) * ((1u << 20) / PAGE);
		hot = alloc(HOT_PAGES);
		cold = alloc(cold_pages);
		fresh = alloc(FRESH_PAGES);
		if (!hot || !cold || !fresh) {
			say("rmem-guest: cannot allocate: %s\n", strerror(errno));
			hang();
		}
	}
	for (uint64_t i = 0; i < cold_pages; i++)
		fill(cold + i * WORDS, seed_of(i, 0, 1));
	for (uint64_t i = 0; i < HOT_PAGES; i++)
		fill(hot + i * WORDS, seed_of(i, 0, 0));
	start_heartbeat();
	pthread_t ft;
	if ((errno = pthread_create(&ft, NULL, freshen, fresh)) != 0)
		say("rmem-guest: no fresh set: %s\n", strerror(errno));
	say("rmem-guest ready\n");

	uint64_t bad = 0;
	struct timespec next;
	clock_gettime(CLOCK_MONOTONIC, &next);
	for (uint64_t round = 1;; round++) {
		for (uint64_t i = 0; i < HOT_PAGES; i++) {
			uint64_t *p = hot + i * WORDS;
			bad += wrong(p, seed_of(i, round - 1, 0));
			fill(p, seed_of(i, round, 0));
		}
		if (round % COLD_EVERY == 0) {
			for (uint64_t i = 0; i < cold_pages; i++)
				bad += wrong(cold + i * WORDS, seed_of(i, 0, 1));
			uint64_t n = __atomic_load_n(&fresh_touched, __ATOMIC_ACQUIRE);
			for (uint64_t i = 0; i < n; i++)
				bad += wrong(fresh + i * WORDS, seed_of(i, 0, 2));
		}
		if (round % TICK_EVERY == 0)
			say("tick %llu bad=%llu\n", (unsigned long long)round,
			    (unsigned long long)bad);

		/* The next round starts ROUND_NS after this one did, or at once when late. */
		next.tv_nsec += ROUND_NS;
		if (next.tv_nsec >= 1000000000L) {
			next.tv_nsec -= 1000000000L;
			next.tv_sec++;
		}
		struct timespec now;
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec > next.tv_sec ||
		    (now.tv_sec == next.tv_sec && now.tv_nsec > next.tv_nsec))
			next = now;
		else
			while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
				;
	}
}
