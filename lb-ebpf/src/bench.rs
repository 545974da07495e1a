//! Benchmark support, attached nowhere: BPF_PROG_TEST_RUN with repeat > 1 feeds the
//! program its own output, so a translated packet would come back as something else. This
//! wrapper restores the template frame before every run (bumping the source port when asked,
//! so each run is a new flow) and tail-calls the program under test. Running it in front of
//! the empty program measures the wrapper itself, in the same run.
use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, ProgramArray},
    helpers::bpf_xdp_adjust_meta,
    macros::{btf_map, xdp},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{checksum, BenchFrame, BENCH_FRAME_LEN};

use crate::packet::{ptr_at, L4_OFF, TCP_CHECK_OFF};

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
        if (*t).new_flow_each_run != 0 {
            let b = &mut (*t).bytes;
            let old = u16::from_ne_bytes([b[L4_OFF], b[L4_OFF + 1]]);
            let new = (u16::from_be(old).wrapping_add(1) | 1024).to_be();
            let check = u16::from_ne_bytes([b[TCP_CHECK_OFF], b[TCP_CHECK_OFF + 1]]);
            b[L4_OFF..L4_OFF + 2].copy_from_slice(&new.to_ne_bytes());
            let check = checksum::replace_u16(check, old, new);
            b[TCP_CHECK_OFF..TCP_CHECK_OFF + 2].copy_from_slice(&check.to_ne_bytes());
        }
        *frame = (*t).bytes;
        LB_BENCH_TARGET.tail_call(&ctx, 0);
    }
    xdp_action::XDP_ABORTED
}
