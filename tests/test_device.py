import pytest

from personalization.device import SD15_UNET_PARAMETERS, plan_memory

SD15 = int(SD15_UNET_PARAMETERS)
GIB = 2**30
T4 = 15_835_660_288  # what torch reports for a 16 GB T4
EIGHT_GB = 8_589_934_592
A10G = 23_609_475_072


def plan(card_bytes, *, full_unet=True, checkpointing=False, eight_bit=False, bitsandbytes=True, params=SD15):
    return plan_memory(params, card_bytes, full_unet=full_unet, gradient_checkpointing=checkpointing,
                       use_8bit_adam=eight_bit, bitsandbytes_available=bitsandbytes)


def test_full_unet_on_a_t4_switches_on_both_memory_options_and_says_why():
    chosen = plan(T4)
    assert (chosen.gradient_checkpointing, chosen.use_8bit_adam) == (True, True)
    assert chosen.note == ("this GPU has 15 GiB and the step needs about 17 GiB as configured: "
                           "switched on gradient checkpointing and 8-bit Adam")


def test_lora_on_an_8_gb_card_gets_checkpointing_and_keeps_the_32_bit_optimizer():
    chosen = plan(EIGHT_GB, full_unet=False)
    assert (chosen.gradient_checkpointing, chosen.use_8bit_adam) == (True, False)
    assert chosen.note.endswith("switched on gradient checkpointing")


@pytest.mark.parametrize(("card", "full_unet"), [(A10G, True), (80 * GIB, True), (T4, False), (None, True)])
def test_cards_with_room_and_the_cpu_change_nothing(card, full_unet):
    assert plan(card, full_unet=full_unet) == plan_memory(SD15, None, full_unet=full_unet,
                                                          gradient_checkpointing=False, use_8bit_adam=False,
                                                          bitsandbytes_available=True)
    assert plan(card, full_unet=full_unet).note is None


def test_without_bitsandbytes_only_checkpointing_is_switched_on():
    chosen = plan(T4, bitsandbytes=False)
    assert (chosen.gradient_checkpointing, chosen.use_8bit_adam, chosen.note.endswith("checkpointing")) == (
        True, False, True)


def test_options_the_user_chose_stay_on_and_are_not_reported_again():
    chosen = plan(80 * GIB, checkpointing=True, eight_bit=True)
    assert (chosen.gradient_checkpointing, chosen.use_8bit_adam, chosen.note) == (True, True, None)
    already = plan(T4, checkpointing=True, eight_bit=True)
    assert (already.gradient_checkpointing, already.use_8bit_adam, already.note) == (True, True, None)


def test_a_small_unet_fits_where_sd15_does_not():
    assert plan(T4, params=SD15 // 4).note is None
