"""Shared jaxtyping aliases: shapes are part of the type."""

from jaxtyping import Array, ArrayLike, Float, Int

Scalar = Float[Array, ""]
ScalarLike = float | int | ArrayLike
Vector = Float[Array, " d"]
Matrix = Float[Array, "d d"]
StepArray = Float[Array, " steps"]
IntStepArray = Int[Array, " steps"]

__all__ = ["Array", "ArrayLike", "Float", "Int", "Scalar", "ScalarLike", "Vector", "Matrix",
           "StepArray", "IntStepArray"]
