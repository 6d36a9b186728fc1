/* vsk: the guest side of vmplay's vsock test (busybox has no AF_VSOCK).
 *   vsk listen PORT         accept one connection, then copy both ways
 *   vsk connect CID PORT    connect, then copy both ways
 *   vsk echo PORT N         accept N connections, echo each (one child each)
 * "Copy both ways": stdin to the socket (then shutdown(SHUT_WR)), the
 * socket to stdout, until the socket reaches EOF. Built static by the test. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static void die(const char *what) {
    fprintf(stderr, "vsk: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int listener(unsigned port) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0) die("socket");
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(s, 64) < 0) die("listen");
    return s;
}

static int write_all(int fd, const char *p, ssize_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= w;
    }
    return 0;
}

static void copy_both_ways(int s) {
    static char buf[65536];
    int in_open = 1;
    for (;;) {
        struct pollfd p[2] = {{.fd = s, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
        if (poll(p, in_open ? 2 : 1, -1) < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        if (p[0].revents) {
            ssize_t n = read(s, buf, sizeof buf);
            if (n < 0) die("read socket");
            if (n == 0) return;
            if (write_all(1, buf, n) < 0) die("write stdout");
        }
        if (in_open && p[1].revents) {
            ssize_t n = read(0, buf, sizeof buf);
            if (n < 0) die("read stdin");
            if (n == 0) {
                in_open = 0;
                shutdown(s, SHUT_WR);
            } else if (write_all(s, buf, n) < 0) {
                die("write socket");
            }
        }
    }
}

static void echo(int c) {
    static char buf[65536];
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("echo read");
        if (n == 0) return;
        if (write_all(c, buf, n) < 0) die("echo write");
    }
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "listen")) {
        int l = listener(atoi(argv[2]));
        int c = accept(l, NULL, NULL);
        if (c < 0) die("accept");
        copy_both_ways(c);
        return 0;
    }
    if (argc == 4 && !strcmp(argv[1], "connect")) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (s < 0) die("socket");
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = atoi(argv[2]), .svm_port = atoi(argv[3])};
        if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
        copy_both_ways(s);
        return 0;
    }
    if (argc == 4 && !strcmp(argv[1], "echo")) {
        int l = listener(atoi(argv[2]));
        int n = atoi(argv[3]);
        for (int i = 0; i < n; i++) {
            int c = accept(l, NULL, NULL);
            if (c < 0) die("accept");
            if (fork() == 0) {
                echo(c);
                _exit(0);
            }
            close(c);
        }
        while (wait(NULL) > 0) {}
        return 0;
    }
    fprintf(stderr, "usage: vsk listen PORT | connect CID PORT | echo PORT N\n");
    return 2;
}
