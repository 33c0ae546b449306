//! Property tests of the planner (filled below).
