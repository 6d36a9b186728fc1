//! How every benchmark prints: what was measured, vmplay's figure, the
//! peer's figure from the same run, their ratio, the goal and PASS/MISS.

/// A goal on a ratio (vmplay / peer, or a slowdown) or an absolute figure.
#[derive(Debug, Clone, Copy)]
pub struct Goal {
    pub at_most: f64,
}

impl Goal {
    pub fn verdict(self, value: f64) -> &'static str {
        if value.is_finite() && value <= self.at_most {
            "PASS"
        } else {
            "MISS"
        }
    }
}

pub fn heading(name: &str, what: &str) {
    println!();
    println!("== {name}: {what}");
}

pub fn note(text: &str) {
    println!("   note: {text}");
}

/// One measured figure.
pub fn figure(who: &str, value: &str) {
    println!("   {who:<34} {value}");
}

/// A ratio line with its goal and verdict.
pub fn ratio(label: &str, value: f64, goal: Goal, goal_text: &str) {
    println!(
        "   {label:<34} {value:>8.3}   goal {goal_text}   {}",
        goal.verdict(value)
    );
}

/// A ratio line without a goal (for context).
pub fn ratio_info(label: &str, value: f64) {
    println!("   {label:<34} {value:>8.3}   (no goal)");
}

/// A row that could not be measured.
pub fn failed(who: &str, why: &str) {
    println!("   {who:<34} failed: {why}");
}

/// Human duration in ms or µs.
pub fn ms(d: f64) -> String {
    format!("{:.2} ms", d * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goal_passes_only_at_or_below_its_bound() {
        let g = Goal { at_most: 1.05 };
        assert_eq!(g.verdict(1.05), "PASS");
        assert_eq!(g.verdict(0.5), "PASS");
        assert_eq!(g.verdict(1.0501), "MISS");
        assert_eq!(g.verdict(f64::NAN), "MISS");
        assert_eq!(g.verdict(f64::INFINITY), "MISS");
    }
}
