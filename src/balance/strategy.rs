//! The strategy names: how the next backend is chosen.

use std::fmt;
use std::str::FromStr;

/// How the next backend is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Strategy {
    /// Weighted, smooth round robin: weights 1,2,3 give 1:2:3 interleaved. The default; best when backends
    /// are alike and connections cost about the same.
    #[default]
    RoundRobin,
    /// The backend with the fewest active connections per unit of weight; ties are broken in rotation.
    /// Best for long or uneven connections (databases, streaming).
    LeastConnections,
    /// Weighted random. Needs no shared cursor; seedable for tests.
    Random,
    /// Power of two choices: two weighted random picks, the less loaded wins. Close to least connections
    /// at the cost of random, and robust when many balancers share backends.
    PowerOfTwoChoices,
}

impl Strategy {
    /// Every strategy, in the order the documentation lists them.
    pub const ALL: [Strategy; 4] = [
        Strategy::RoundRobin,
        Strategy::LeastConnections,
        Strategy::Random,
        Strategy::PowerOfTwoChoices,
    ];

    /// The name used on the command line and in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastConnections => "least-connections",
            Strategy::Random => "random",
            Strategy::PowerOfTwoChoices => "p2c",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a strategy name that is not known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown strategy '{0}' (expected round-robin, least-connections, random or p2c)")]
pub struct UnknownStrategy(pub String);

impl FromStr for Strategy {
    type Err = UnknownStrategy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "round-robin" | "roundrobin" | "rr" => Ok(Strategy::RoundRobin),
            "least-connections" | "leastconn" | "lc" => Ok(Strategy::LeastConnections),
            "random" => Ok(Strategy::Random),
            "p2c" | "power-of-two-choices" => Ok(Strategy::PowerOfTwoChoices),
            _ => Err(UnknownStrategy(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in Strategy::ALL {
            assert_eq!(s.as_str().parse::<Strategy>(), Ok(s));
        }
        let err = "fastest".parse::<Strategy>().unwrap_err().to_string();
        assert!(err.contains("'fastest'"), "{err}");
    }
}
