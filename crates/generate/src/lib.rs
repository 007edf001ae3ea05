//! Model architectures and the generation loop.
