class DimpleGenerationMixin:
    pass
