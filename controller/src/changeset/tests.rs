//! Tests of the whole pipeline (each module's own tests sit beside it).

mod corpus;
