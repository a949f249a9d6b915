/* The plain TCP backend of the l4 and egress phases (l4egress.py): one epoll thread on
 * 127.0.0.1:PORT, cheap enough to stay out of the way of the proxies in front of it.
 * The first byte of a connection chooses what it does:
 *   'E'  echo: every byte (the 'E' too) is written back; back-pressure: a connection is not read
 *        while its last read is not written yet.
 *   'S'  sink: 8 more bytes give N (big-endian); N bytes after them are read and dropped, then
 *        one byte 'K' is written (so the sender knows every byte went through the proxy).
 *   else a one-shot HTTP responder (wrk's "GET ... Connection: close"): once "\r\n\r\n" is seen,
 *        a 2-byte 200 response with Connection: close is written and the connection closed.
 *   tcp_backend PORT        (gcc -O2 -o tcp_backend tcp_backend.c; setup.sh builds it)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF (256 * 1024)
static const char RESPONSE[] =
    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

struct conn {
    int fd;
    char mode;          /* 0 until the first byte, then 'E', 'S' or 'H' */
    uint64_t need;      /* sink: bytes still to drop */
    int hdr;            /* sink: length bytes read so far (0..8) */
    uint32_t tail;      /* responder: the last 4 bytes seen */
    size_t have, off;   /* echo: pending bytes buf[off..have) */
    char buf[BUF];
};

static int ep;

static void watch(struct conn *c, uint32_t ev, int op) {
    struct epoll_event e = {.events = ev, .data.ptr = c};
    epoll_ctl(ep, op, c->fd, &e);
}

static void drop(struct conn *c) {
    close(c->fd); /* also removes it from the epoll set */
    free(c);
}

/* Write what is pending; 1 = all written, 0 = wait for EPOLLOUT, -1 = error. */
static int flush(struct conn *c) {
    while (c->off < c->have) {
        ssize_t n = write(c->fd, c->buf + c->off, c->have - c->off);
        if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
        c->off += (size_t)n;
    }
    c->off = c->have = 0;
    return 1;
}

/* Consume n bytes just read into buf; returns -1 to close the connection. */
static int consume(struct conn *c, size_t n) {
    size_t i = 0;
    if (!c->mode) {
        c->mode = (c->buf[0] == 'E' || c->buf[0] == 'S') ? c->buf[0] : 'H';
        if (c->mode == 'S') i = 1; /* the 'S' itself */
    }
    if (c->mode == 'E') {
        c->have = n;
        c->off = 0;
        int r = flush(c);
        if (r == 0) watch(c, EPOLLOUT, EPOLL_CTL_MOD);
        return r < 0 ? -1 : 0;
    }
    if (c->mode == 'S') {
        for (; i < n && c->hdr < 8; i++, c->hdr++) c->need = (c->need << 8) | (uint8_t)c->buf[i];
        if (c->hdr < 8) return 0;
        uint64_t got = n - i;
        c->need = got >= c->need ? 0 : c->need - got;
        if (c->need == 0) return write(c->fd, "K", 1) == 1 ? 0 : -1;
        return 0;
    }
    for (; i < n; i++) { /* 'H' */
        c->tail = (c->tail << 8) | (uint8_t)c->buf[i];
        if (c->tail == 0x0d0a0d0a) {
            if (write(c->fd, RESPONSE, sizeof RESPONSE - 1) < 0) return -1;
            return -1; /* answered: close */
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: tcp_backend PORT\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN); /* a peer gone before our write: EPIPE, not death */
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) {
        perror("tcp_backend: bind/listen");
        return 1;
    }
    ep = epoll_create1(0);
    struct epoll_event le = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &le);
    struct epoll_event evs[64];
    for (;;) {
        int k = epoll_wait(ep, evs, 64, -1);
        for (int j = 0; j < k; j++) {
            struct conn *c = evs[j].data.ptr;
            if (!c) { /* the listener */
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    if (!c) { close(fd); continue; }
                    c->fd = fd;
                    watch(c, EPOLLIN, EPOLL_CTL_ADD);
                }
                continue;
            }
            if (evs[j].events & EPOLLOUT) { /* echo: pending bytes first, then read again */
                int r = flush(c);
                if (r < 0) drop(c);
                else if (r > 0) watch(c, EPOLLIN, EPOLL_CTL_MOD);
                continue;
            }
            ssize_t n = read(c->fd, c->buf, BUF);
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) continue;
            if (n <= 0 || consume(c, (size_t)n) < 0) drop(c);
        }
    }
}
