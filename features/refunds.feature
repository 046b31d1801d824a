Feature: Refunding a booking
  When the booking saga has to undo a booking, it asks the payment service for the money
  back: all of it, or part of it, as often as needed, but never more than was charged.
  Each refund request is answered once: the refund was made, or it failed and why.

  Scenario: A refund after a successful payment gives the money back
    Given the payment processor approves every charge
    And the saga has requested a payment of 125.00 EUR for booking "BK-R1"
    When the saga asks for a refund of 125.00 EUR for booking "BK-R1"
    Then the saga is told 125.00 EUR of booking "BK-R1" was refunded, 125.00 EUR in all
    And the gateway refunded 125.00 EUR for booking "BK-R1"

  Scenario: A partial refund, then the rest
    Given the payment processor approves every charge
    And the saga has requested a payment of 100.00 EUR for booking "BK-R2"
    When the saga asks for a refund of 30.00 EUR for booking "BK-R2"
    And the saga asks for a refund of what is left for booking "BK-R2"
    Then the saga is told 30.00 EUR of booking "BK-R2" was refunded, 30.00 EUR in all
    And the saga is told 70.00 EUR of booking "BK-R2" was refunded, 100.00 EUR in all
    And the gateway refunded 100.00 EUR for booking "BK-R2"

  Scenario: A refund of more than is left is refused
    Given the payment processor approves every charge
    And the saga has requested a payment of 50.00 EUR for booking "BK-R3"
    And the saga has asked for a refund of 40.00 EUR for booking "BK-R3"
    When the saga asks for a refund of 20.00 EUR for booking "BK-R3"
    Then the saga is told the refund for booking "BK-R3" failed as an over-refund
    And the gateway refunded 40.00 EUR for booking "BK-R3"

  Scenario: A refund of a failed payment is refused: nothing was charged
    Given the payment processor declines every charge
    And the saga has requested a payment of 80.00 EUR for booking "BK-R4"
    When the saga asks for a refund of what is left for booking "BK-R4"
    Then the saga is told the refund for booking "BK-R4" failed as not charged
    And the gateway refunded 0.00 EUR for booking "BK-R4"
