//! Batched UDP system calls: `recvmmsg` into preallocated buffers and `sendmmsg` out of the
//! same buffers, so a relay forwards a whole batch in two system calls and no copies.
//!
//! Written against libc rather than quinn-udp: quinn-udp batches receives, but on the send
//! side it batches only by GSO, which requires one destination and one size per call. A relay
//! sends each datagram of a batch to its own next hop, which is what `sendmmsg` is for.

use std::io;
use std::mem::{self, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use crate::wire::MAX_DATAGRAM;

/// Datagrams per batch.
pub const BATCH: usize = 64;
/// Receive buffer size: larger than [`MAX_DATAGRAM`] so that an oversized datagram is seen
/// as oversized rather than silently truncated to a valid length.
pub const BUF_LEN: usize = 2048;
const _: () = assert!(BUF_LEN > MAX_DATAGRAM);

/// Buffers, addresses and message headers for one batch, allocated once.
///
/// The headers point into the buffers; all live in boxed slices whose heap addresses do not
/// change when this struct moves.
pub struct Batch {
    bufs: Box<[[u8; BUF_LEN]]>,
    lens: Box<[usize]>,
    from: Box<[libc::sockaddr_storage]>,
    recv_iov: Box<[libc::iovec]>,
    recv_hdrs: Box<[libc::mmsghdr]>,
    send_to: Box<[libc::sockaddr_storage]>,
    send_iov: Box<[libc::iovec]>,
    send_hdrs: Box<[libc::mmsghdr]>,
    queued: usize,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("queued", &self.queued).finish_non_exhaustive()
    }
}

// SAFETY: the raw pointers inside the headers point only into this struct's own boxed slices.
unsafe impl Send for Batch {}

fn zeroed<T>() -> T {
    // SAFETY: only used for libc plain-old-data structs, for which all-zero is a valid value.
    unsafe { MaybeUninit::<T>::zeroed().assume_init() }
}

impl Default for Batch {
    fn default() -> Self {
        Batch::new()
    }
}

impl Batch {
    /// Allocates a batch of [`BATCH`] buffers.
    pub fn new() -> Batch {
        let mut b = Batch {
            bufs: vec![[0u8; BUF_LEN]; BATCH].into_boxed_slice(),
            lens: vec![0; BATCH].into_boxed_slice(),
            from: (0..BATCH).map(|_| zeroed()).collect(),
            recv_iov: (0..BATCH).map(|_| zeroed()).collect(),
            recv_hdrs: (0..BATCH).map(|_| zeroed()).collect(),
            send_to: (0..BATCH).map(|_| zeroed()).collect(),
            send_iov: (0..BATCH).map(|_| zeroed()).collect(),
            send_hdrs: (0..BATCH).map(|_| zeroed()).collect(),
            queued: 0,
        };
        for i in 0..BATCH {
            b.recv_iov[i] = libc::iovec { iov_base: b.bufs[i].as_mut_ptr().cast(), iov_len: BUF_LEN };
            let h = &mut b.recv_hdrs[i].msg_hdr;
            h.msg_name = (&mut b.from[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut b.recv_iov[i];
            h.msg_iovlen = 1;
            let h = &mut b.send_hdrs[i].msg_hdr;
            h.msg_name = (&mut b.send_to[i] as *mut libc::sockaddr_storage).cast();
            h.msg_iov = &mut b.send_iov[i];
            h.msg_iovlen = 1;
        }
        b
    }

    /// Receives up to [`BATCH`] datagrams without blocking; returns how many. `WouldBlock`
    /// when none is waiting.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_flags(fd, libc::MSG_DONTWAIT)
    }

    /// Receives at least one datagram, waiting for it (up to the socket's receive timeout),
    /// and up to [`BATCH`] that are already there. For blocking sockets on dedicated threads.
    pub fn recv_wait(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_flags(fd, libc::MSG_WAITFORONE)
    }

    fn recv_flags(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<usize> {
        for h in self.recv_hdrs.iter_mut() {
            h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
        }
        // SAFETY: every header points at a live buffer, iovec and address of this batch, sized
        // as declared; the kernel writes at most that much.
        let n = unsafe { libc::recvmmsg(fd, self.recv_hdrs.as_mut_ptr(), BATCH as u32, flags, std::ptr::null_mut()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            // A datagram larger than the buffer is truncated by the kernel; report its full
            // length capped at the buffer so the parser refuses it as oversized.
            self.lens[i] = (self.recv_hdrs[i].msg_len as usize).min(BUF_LEN);
        }
        Ok(n)
    }

    /// Datagram `i` (`i < BATCH`, taken modulo) of the last receive: its sender and bytes,
    /// mutable for in-place work.
    pub fn received(&mut self, i: usize) -> (Option<SocketAddr>, &mut [u8]) {
        let i = i % BATCH;
        let from = from_storage(&self.from[i]);
        let len = self.lens[i];
        (from, &mut self.bufs[i][..len])
    }

    /// Queues the first `len` bytes of buffer `i` for sending to `to`. Returns `false` (and
    /// queues nothing) when `i` is not a buffer or [`BATCH`] datagrams are already queued.
    pub fn queue(&mut self, i: usize, len: usize, to: SocketAddr) -> bool {
        let k = self.queued;
        if k >= BATCH || i >= BATCH {
            return false;
        }
        self.send_iov[k] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: len.min(BUF_LEN) };
        self.send_hdrs[k].msg_hdr.msg_namelen = to_storage(to, &mut self.send_to[k]);
        self.queued += 1;
        true
    }

    /// Number of datagrams queued for sending.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Sends every queued datagram; returns how many the kernel took. Those it did not take
    /// (a full socket buffer) are dropped: the caller counts them.
    pub fn send(&mut self, fd: RawFd) -> io::Result<usize> {
        self.send_flags(fd, libc::MSG_DONTWAIT)
    }

    /// Sends every queued datagram, waiting for socket buffer space. For blocking sockets on
    /// dedicated threads (load generators).
    pub fn send_wait(&mut self, fd: RawFd) -> io::Result<usize> {
        self.send_flags(fd, 0)
    }

    fn send_flags(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<usize> {
        let mut off = 0;
        while off < self.queued {
            // SAFETY: headers [off, queued) point at live iovecs and addresses set by `queue`.
            let n =
                unsafe { libc::sendmmsg(fd, self.send_hdrs.as_mut_ptr().add(off), (self.queued - off) as u32, flags) };
            if n < 0 {
                let e = io::Error::last_os_error();
                self.queued = 0;
                return if off > 0 { Ok(off) } else { Err(e) };
            }
            off += n as usize;
        }
        self.queued = 0;
        Ok(off)
    }

    /// Writes `bytes` into buffer `i % BATCH` (for datagrams built outside the receive path).
    pub fn fill(&mut self, i: usize, bytes: &[u8]) -> usize {
        let n = bytes.len().min(BUF_LEN);
        self.bufs[i % BATCH][..n].copy_from_slice(&bytes[..n]);
        n
    }

    /// Buffer `i % BATCH`, whole, for datagrams built in place.
    pub fn buffer(&mut self, i: usize) -> &mut [u8; BUF_LEN] {
        &mut self.bufs[i % BATCH]
    }
}

/// Converts a kernel socket address.
pub fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in, which it is large
            // enough for and aligned for.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
        }
        _ => None,
    }
}

/// Writes `addr` into `s`; returns the length to declare.
pub fn to_storage(addr: SocketAddr, s: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in.
            let out = unsafe { &mut *(s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            out.sin_family = libc::AF_INET as libc::sa_family_t;
            out.sin_port = a.port().to_be();
            out.sin_addr = libc::in_addr { s_addr: u32::from(*a.ip()).to_be() };
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in6.
            let out = unsafe { &mut *(s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            out.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            out.sin6_port = a.port().to_be();
            out.sin6_flowinfo = a.flowinfo();
            out.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            out.sin6_scope_id = a.scope_id();
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Binds `n` UDP sockets to one address with `SO_REUSEPORT`, so that the kernel spreads
/// senders over them by flow hash (one socket per worker thread). With port 0 the first
/// socket picks the port and the others join it. Buffers are enlarged to `buffer` bytes.
pub fn bind_reuseport(addr: SocketAddr, n: usize, buffer: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    let mut out = Vec::with_capacity(n);
    let mut at = addr;
    for _ in 0..n.max(1) {
        let sock = shoal_link::daemon::bind_udp(at, buffer, n > 1)?;
        at = sock.local_addr()?;
        out.push(sock);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn batch_round_trip_on_loopback() {
        let a = bind_reuseport("127.0.0.1:0".parse().unwrap(), 1, 1 << 20).unwrap().remove(0);
        let b = bind_reuseport("127.0.0.1:0".parse().unwrap(), 1, 1 << 20).unwrap().remove(0);
        let mut tx = Batch::new();
        for i in 0..10u8 {
            let n = tx.fill(i as usize, &[i; 100]);
            assert!(tx.queue(i as usize, n, b.local_addr().unwrap()));
        }
        assert_eq!(tx.send(a.as_raw_fd()).unwrap(), 10);
        let mut rx = Batch::new();
        let mut got = 0;
        for _ in 0..100 {
            match rx.recv(b.as_raw_fd()) {
                Ok(n) => {
                    for i in 0..n {
                        let (from, bytes) = rx.received(i);
                        assert_eq!(from, Some(a.local_addr().unwrap()));
                        assert_eq!(bytes, &[(got + i) as u8; 100][..]);
                    }
                    got += n;
                    if got == 10 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, 10);
    }

    #[test]
    fn v6_addresses_convert_both_ways() {
        let addr: SocketAddr = "[::1]:4433".parse().unwrap();
        let mut s = zeroed();
        to_storage(addr, &mut s);
        assert_eq!(from_storage(&s), Some(addr));
    }
}
