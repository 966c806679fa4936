//! Tests of the rollout engine: a simulated fleet and clock (`sim`), unit
//! tests per area, and property tests over random fleets (`props`).

mod changesets;
mod control;
mod gates;
mod policies;
mod props;
mod retries;
mod sequence;
mod sim;
