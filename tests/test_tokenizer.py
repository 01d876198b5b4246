import pytest

from promptehr.schema import Patient
from promptehr.tokenizer import SPECIAL_TOKENS, DiagnosisCodeTokenizer


def make():
    patients = [Patient("a", 50, "M", [["4019", "0389"], ["V5861"]]), Patient("b", 3, "F", [["0389", "7742"]])]
    return DiagnosisCodeTokenizer.from_patients(patients)


def test_one_token_per_code_and_specials_first():
    tok = make()
    assert tok.codes == ["0389", "4019", "7742", "V5861"]
    assert len(tok) == len(SPECIAL_TOKENS) + 4
    assert all(tok.token_to_id[s] < tok.n_special for s in SPECIAL_TOKENS)
    assert tok.encode_code("0389") == tok.token_to_id["0389"] >= tok.n_special


def test_saved_vocabulary_loads_to_the_same_ids(tmp_path):
    tok = make()
    tok.save(tmp_path / "vocab.json")
    again = DiagnosisCodeTokenizer.load(tmp_path / "vocab.json")
    assert again.token_to_id == tok.token_to_id and again.codes == tok.codes


def test_unknown_codes_map_to_unk_or_raise():
    tok = make()
    assert tok.encode_code("99999") == tok.unk_token_id
    with pytest.raises(KeyError, match="99999"):
        tok.encode_code("99999", strict=True)
    with pytest.raises(KeyError, match="<pad>"):  # a special token's name is not a code
        tok.encode_code("<pad>", strict=True)


def test_rejects_bad_vocabularies():
    with pytest.raises(ValueError, match="special"):
        DiagnosisCodeTokenizer(["4019", "<mask>"])
    with pytest.raises(ValueError, match="duplicates"):
        DiagnosisCodeTokenizer(["4019", "4019"])


def test_a_frequency_ordered_vocabulary_numbers_codes_most_frequent_first_and_keeps_its_order(tmp_path):
    patients = [Patient("a", 50, "M", [["4019", "0389"], ["V5861", "4019"]]), Patient("b", 3, "F", [["0389", "4019"]])]
    tok = DiagnosisCodeTokenizer.from_patients(patients, "frequency")
    assert tok.ordered and tok.codes == ["4019", "0389", "V5861"]  # 3, 2, 1 occurrences
    tok.save(tmp_path / "vocab.json")
    again = DiagnosisCodeTokenizer.load(tmp_path / "vocab.json")
    assert again.ordered and again.codes == tok.codes
    assert not DiagnosisCodeTokenizer.from_patients(patients).ordered  # the default: random order, alphabetical
    with pytest.raises(ValueError, match="visit_order"):
        DiagnosisCodeTokenizer.from_patients(patients, "alphabetical")
    (tmp_path / "bad.json").write_text((tmp_path / "vocab.json").read_text().replace('"frequency"', '"sorted"'))
    with pytest.raises(ValueError, match="bad.json: visit_order"):
        DiagnosisCodeTokenizer.load(tmp_path / "bad.json")
