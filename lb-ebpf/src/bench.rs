//! Benchmark support, attached nowhere: BPF_PROG_TEST_RUN with repeat > 1 feeds the
//! program its own output, so a translated packet would come back as something else. This
//! wrapper restores the template frame before every run with word-sized stores (giving each
//! run a source address and port no earlier run used, when asked, so each run is a new
//! flow) and tail-calls the program under test. Running it in front of the empty program
//! measures the wrapper itself, in the same run.
use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, ProgramArray},
    helpers::bpf_xdp_adjust_meta,
    macros::{btf_map, xdp},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{checksum, BenchFrame, BENCH_FRAME_LEN};

use crate::packet::{ptr_at, IP_CHECK_OFF, IP_SRC_OFF, L4_OFF, TCP_CHECK_OFF};

#[btf_map]
static LB_BENCH_FRAME: Array<BenchFrame, 1> = Array::new();

#[btf_map]
static LB_BENCH_TARGET: ProgramArray<1> = ProgramArray::new();

#[xdp]
pub fn lb_bench_restore(ctx: XdpContext) -> u32 {
    // The test run does not reset the context between runs: drop the metadata the last
    // run left in front of the frame (a hand-over tag).
    let meta_len = ctx.data() - ctx.metadata();
    // SAFETY: shrinking the metadata area by its own length.
    if meta_len > 0 && unsafe { bpf_xdp_adjust_meta(ctx.as_ptr() as *mut _, meta_len as i32) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    let (Some(t), Some(frame)) =
        (LB_BENCH_FRAME.get_ptr_mut(0), ptr_at::<[u8; BENCH_FRAME_LEN]>(ctx.data(), ctx.data_end(), 0))
    else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: the map value and the bounds-checked frame are valid for the whole run.
    unsafe {
        let src = (*t).bytes.as_ptr();
        let dst = frame as *mut u8;
        for i in 0..BENCH_FRAME_LEN / 8 {
            (dst.add(i * 8) as *mut u64).write_unaligned((src.add(i * 8) as *const u64).read_unaligned());
        }
        let tail = BENCH_FRAME_LEN / 8 * 8;
        (dst.add(tail) as *mut u32).write_unaligned((src.add(tail) as *const u32).read_unaligned());
        (dst.add(tail + 4) as *mut u16).write_unaligned((src.add(tail + 4) as *const u16).read_unaligned());
        if (*t).new_flow_each_run != 0 {
            new_flow(dst, (*t).runs);
            (*t).runs = (*t).runs.wrapping_add(1);
        }
        LB_BENCH_TARGET.tail_call(&ctx, 0);
    }
    xdp_action::XDP_ABORTED
}

/// Gives run `n` its own source: port 1024 + n % 60000, the address's low 16 bits + n /
/// 60000, with the IPv4 and TCP checksums updated.
///
/// # Safety
/// `frame` points at BENCH_FRAME_LEN writable bytes.
#[inline(always)]
unsafe fn new_flow(frame: *mut u8, n: u32) {
    let port_ptr = frame.add(L4_OFF) as *mut u16;
    let addr_ptr = frame.add(IP_SRC_OFF + 2) as *mut u16;
    let ip_check_ptr = frame.add(IP_CHECK_OFF) as *mut u16;
    let tcp_check_ptr = frame.add(TCP_CHECK_OFF) as *mut u16;
    let (old_port, old_addr) = (port_ptr.read_unaligned(), addr_ptr.read_unaligned());
    let new_port = ((1024 + n % 60_000) as u16).to_be();
    let new_addr = u16::from_be(old_addr).wrapping_add((n / 60_000) as u16).to_be();
    port_ptr.write_unaligned(new_port);
    addr_ptr.write_unaligned(new_addr);
    let ip_check = checksum::replace_u16(ip_check_ptr.read_unaligned(), old_addr, new_addr);
    ip_check_ptr.write_unaligned(ip_check);
    let mut tcp_check = checksum::replace_u16(tcp_check_ptr.read_unaligned(), old_addr, new_addr);
    tcp_check = checksum::replace_u16(tcp_check, old_port, new_port);
    tcp_check_ptr.write_unaligned(tcp_check);
}
