//! Test support for the executor's unit tests (`#[cfg(test)]` in `src/`) and integration tests
//! (`tests/it`): [`skip`], the capability skips that `EXECUTOR_TEST_REQUIRE` turns into failures,
//! and [`cluster`], a throwaway PostgreSQL cluster. Kept out of the library so that nothing of
//! it ships in the executor.

pub mod cluster;
pub mod skip;
