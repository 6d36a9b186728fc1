//! Interpreter speed on small loops (run with `--ignored --nocapture`).

use std::time::Instant;

use iced_x86::code_asm::*;

use super::guest::*;

fn measure(name: &str, iters: u64, per_iter: u64, body: impl FnOnce(&mut CodeAssembler)) -> f64 {
    let mut g = Guest::new(1);
    let mut s = g.long_mode(CODE);
    s.gpr[1] = iters;
    s.gpr[6] = 0x40_0000;
    g.code(64, CODE, body);
    g.vcpu.set_state(&s).unwrap();
    let t = Instant::now();
    let o = g.run();
    let dt = t.elapsed().as_secs_f64();
    assert_eq!(o.end, End::Halt);
    let mips = (iters * per_iter) as f64 / dt / 1e6;
    eprintln!(
        "{name}: {:.0} M insns in {dt:.3} s = {mips:.0} MIPS",
        (iters * per_iter) as f64 / 1e6
    );
    mips
}

#[test]
#[ignore]
fn interpreter_speed_on_loops() {
    measure("integer loop", 50_000_000, 4, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.add(rax, rcx).unwrap();
        a.xor(rdx, rax).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(l).unwrap();
        a.hlt().unwrap();
    });
    measure("memory loop", 20_000_000, 5, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.mov(rax, qword_ptr(rsi + 8)).unwrap();
        a.add(rax, rcx).unwrap();
        a.mov(qword_ptr(rsi + 8), rax).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(l).unwrap();
        a.hlt().unwrap();
    });
    measure("mul/adc loop", 20_000_000, 7, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.mov(rax, rcx).unwrap();
        a.mul(rcx).unwrap();
        a.add(r8, rax).unwrap();
        a.adc(r9, rdx).unwrap();
        a.adc(r10, 0).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(l).unwrap();
        a.hlt().unwrap();
    });
}
