import pytest

from tests.helpers import W, LinearClassifier


@pytest.fixture
def linear():
    return LinearClassifier(W.clone())
