/* Guest side of vmplay-bench's `block` row: the I/O pattern of
 *   dd if=DEV of=/dev/null bs=1M count=64 iflag=direct
 *   dd if=/dev/zero of=DEV bs=1M count=64 oflag=direct seek=64
 * and COUNT random 4 KiB O_DIRECT reads, each timed with the guest's
 * CLOCK_MONOTONIC in one process (so the shell's fork+exec is not in the
 * figure); then the sequential read once more (its code warm: the
 * first pass's time less this one's is what getting the kernel's read
 * path hot cost). Prints:
 * "vmplay-block seqread S seqwrite S randread S COUNT seqread2 S". */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: blkbench DEV COUNT\n"); return 2; }
    int count = atoi(argv[2]);
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    if (fd < 0) { perror(argv[1]); return 1; }
    void *buf;
    if (posix_memalign(&buf, 4096, 1 << 20)) return 1;
    memset(buf, 0x5a, 1 << 20);
    double t0 = now();
    for (int i = 0; i < 64; i++)
        if (pread(fd, buf, 1 << 20, (off_t)i << 20) != 1 << 20) { perror("read"); return 1; }
    double t1 = now();
    for (int i = 0; i < 64; i++)
        if (pwrite(fd, buf, 1 << 20, (off_t)(64 + i) << 20) != 1 << 20) { perror("write"); return 1; }
    if (fdatasync(fd)) { perror("fdatasync"); return 1; }
    double t2 = now();
    unsigned long long x = 88172645463325252ULL;
    for (int i = 0; i < count; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        off_t at = (off_t)(x % (32768 - 1)) << 12; /* within 128 MiB */
        if (pread(fd, buf, 4096, at) != 4096) { perror("randread"); return 1; }
    }
    double t3 = now();
    for (int i = 0; i < 64; i++)
        if (pread(fd, buf, 1 << 20, (off_t)i << 20) != 1 << 20) { perror("read"); return 1; }
    double t4 = now();
    printf("vmplay-block seqread %.4f seqwrite %.4f randread %.4f %d seqread2 %.4f\n",
           t1 - t0, t2 - t1, t3 - t2, count, t4 - t3);
    return 0;
}
